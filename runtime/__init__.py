"""ssmstream.runtime — onnxruntime serving; never imports torch."""
