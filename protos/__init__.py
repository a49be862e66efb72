"""ssmstream.protos — the .proto and its generated stubs."""
