"""ServerConfig/flags and the bearer-token table: pure parts of the server, no model needed."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import re

import pytest
import ssmstream.runtime.server as server_module
from ssmstream.runtime.auth import TokenTable
from ssmstream.runtime.config import (
    GROUPS,
    ServerConfig,
    _add_flag,
    build_parser,
    config_fields,
    parse_config,
)
from ssmstream.runtime.redis_backend import RedisBackend, without_password


def test_every_config_field_has_exactly_one_flag_with_help():
    parser = build_parser()
    actions = [a for a in parser._actions if a.dest != "help"]
    dests = [a.dest for a in actions]
    assert sorted(dests) == sorted(config_fields())  # each field once, nothing else
    for action in actions:
        assert action.help and len(action.help) > 5, f"{action.dest} has no help text"
        flags = action.option_strings
        if action.dest == "model_dir":
            assert flags == [] and action.required, "model_dir stays positional"
        else:
            flag = "--" + action.dest.replace("_", "-")
            bool_pair = [flag, "--no-" + action.dest.replace("_", "-")]
            assert flags in ([flag], bool_pair), flags
    groups = {g.title: [a.dest for a in g._group_actions] for g in parser._action_groups}
    assert list(groups)[2:] == list(GROUPS)  # after "positional arguments" and "options"
    text = parser.format_help()
    assert all(re.search(f"--{name.replace('_', '-')}[ ,]", text) for name in config_fields()[1:])


def test_parsed_defaults_are_the_dataclass_defaults():
    parsed = vars(build_parser().parse_args(["m/"]))
    declared = {f.name: f.default for f in dataclasses.fields(ServerConfig)}
    assert parsed == {**declared, "model_dir": "m/"}
    assert ServerConfig(**parsed) == ServerConfig(model_dir="m/")
    # each default written out as text parses back to itself: the flag's type fits the field
    argv = ["m/"]
    for name, value in declared.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):  # a flag pair: --x / --no-x
            argv += [flag if value else "--no-" + name.replace("_", "-")]
        elif name != "model_dir" and value is not None:
            argv += [flag, str(value)]
    again = vars(build_parser().parse_args(argv))
    assert again == parsed
    assert [type(v) for v in again.values()] == [type(v) for v in parsed.values()]


def test_optional_ints_and_choices_parse_as_flags():
    c = parse_config(["m/", "--threads", "3", "--metrics-port", "0", "--log-level", "DEBUG"])
    assert (c.threads, c.metrics_port, c.log_level) == (3, 0, "DEBUG")
    assert type(c.threads) is int and type(c.metrics_port) is int
    assert (parse_config(["m/"]).threads, parse_config(["m/"]).metrics_port) == (None, None)


def test_a_boolean_field_becomes_a_flag_pair():
    @dataclasses.dataclass
    class Flags:
        tf32: bool = dataclasses.field(default=False, metadata={"group": "g", "help": "TF32"})

    parser = argparse.ArgumentParser()
    _add_flag(parser, dataclasses.fields(Flags)[0], bool)
    assert parser.parse_args([]).tf32 is False
    assert parser.parse_args(["--tf32"]).tf32 is True
    assert parser.parse_args(["--tf32", "--no-tf32"]).tf32 is False


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--threads", "two"], "--threads: invalid int value"),
        (["--threads", "0"], "--threads: must be >= 1"),
        (["--step-threads", "1025"], "--step-threads: must be >= 1 and <= 1024"),
        (["--device", "tpu"], "--device: invalid choice"),
        (["--session-ttl", "soon"], "--session-ttl: invalid float value"),
        (["--tls-cert", "c.pem"], "--tls-cert/--tls-key: give both"),
    ],
)
def test_bad_flag_values_exit_naming_the_flag(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        parse_config(["m/", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_flags_map_onto_the_dataclass():
    c = parse_config(
        [
            "m/",
            "--port",
            "0",
            "--max-sessions",
            "7",
            "--max-batch-delay",
            "0.01",
            "--session-ttl",
            "3.5",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
        ]
    )
    assert (c.model_dir, c.port, c.max_sessions) == ("m/", 0, 7)
    assert (c.max_batch_delay, c.session_ttl) == (0.01, 3.5)
    assert (c.tls_cert, c.tls_key, c.host) == ("c.pem", "k.pem", "127.0.0.1")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"port": 70000}, "port"),
        ({"max_sessions": 0}, "max_sessions"),
        ({"max_batch": -1}, "max_batch"),
        ({"session_ttl": 0}, "session_ttl"),
        ({"max_batch_delay": float("nan")}, "max_batch_delay"),
        ({"grace": -1.0}, "grace"),
        ({"tls_cert": "c.pem"}, "tls_cert/tls_key"),
        ({"tls_client_ca": "ca.pem"}, "tls_client_ca"),
        ({"metrics_port": -2}, "metrics_port"),
        ({"device": "tpu"}, "device"),
        ({"max_tokens_per_request": 2.5}, "max_tokens_per_request"),
        # values the server cannot hold (grpc's int32 options, ModelInfo.limits' uint32)
        ({"max_message_bytes": 2**31}, "max_message_bytes"),
        ({"max_concurrent_rpcs": 2**31}, "max_concurrent_rpcs"),
        ({"max_tokens_per_request": 2**32}, "max_tokens_per_request"),
        ({"max_new_tokens": 2**32}, "max_new_tokens"),
        ({"max_sessions_per_principal": 2**32}, "max_sessions_per_principal"),
        ({"rewind_window": 2**62}, "rewind_window"),
        ({"session_ttl": 1e16}, "session_ttl"),
        ({"max_batch_delay": 10.0}, "max_batch_delay"),
        ({"save_interval": 5.0}, "save_interval"),  # without --state-dir: nowhere to save
        # a blank path (an unset $VAR) had turned the feature off: auth, saving, the key
        ({"auth_tokens": ""}, "auth_tokens"),
        ({"host": "[]"}, "host"),  # brackets around nothing: no address either
        ({"state_dir": " "}, "state_dir"),
        ({"snapshot_key": ""}, "snapshot_key"),
        ({"port_file": ""}, "port_file"),
        ({"tls_cert": "", "tls_key": ""}, "tls_cert"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        ServerConfig(model_dir="m", **kwargs)


def test_bad_flag_exits_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["m/", "--max-batch", "0"])
    assert e.value.code == 2
    assert "--max-batch: must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("ttl", [1e-9, 0.05, 0.1999])
def test_a_session_ttl_shorter_than_the_idle_sweep_keeps_to_is_refused(ttl, capsys):
    """The idle sweep runs every TTL/4, at most every 0.05 s: a TTL under 0.2 s is not kept
    to, and one of 1e-9 s expired every session before its next call."""
    with pytest.raises(ValueError) as e:
        ServerConfig(model_dir="m", session_ttl=ttl)
    assert str(e.value) == f"session_ttl: must be >= 0.2 and <= 1e+09 seconds, got {ttl}"
    with pytest.raises(SystemExit) as ex:
        parse_config(["m", "--session-ttl", str(ttl)])
    assert ex.value.code == 2
    assert (
        f"--session-ttl: must be >= 0.2 and <= 1e+09 seconds, got {ttl}" in capsys.readouterr().err
    )
    assert ServerConfig(model_dir="m", session_ttl=0.2).session_ttl == 0.2


@pytest.mark.parametrize("host", ["0", "127.1", "0x7f.0.0.1", "2130706433", "0127.0.0.1"])
def test_an_ipv4_address_written_short_is_refused_with_the_address_in_full(host):
    """gRPC's resolver takes these for names it cannot find (or reads a leading zero as
    decimal where the system reads octal): the error names --host and the address the
    system's resolver makes of it."""
    import socket

    full = socket.getaddrinfo(host, 0, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    with pytest.raises(ValueError) as e:
        ServerConfig(model_dir="m", host=host)
    assert str(e.value) == (
        f"host: {host!r} is an IPv4 address written short, which gRPC reads otherwise or not "
        f"at all; write it in full (the system reads it as {full})"
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1", "::", "[::1]", "localhost", "cafe"])
def test_addresses_in_full_and_names_are_left_to_the_bind(host):
    assert ServerConfig(model_dir="m", host=host).host == host.strip("[]")


def test_ipv6_address_is_bracketed():
    assert ServerConfig(model_dir="m", host="::1", port=5).address == "[::1]:5"
    assert ServerConfig(model_dir="m", port=5).address == "127.0.0.1:5"


def test_token_table_maps_tokens_to_principals(tmp_path):
    f = tmp_path / "tokens"
    f.write_text("# token principal\nsecret-a alice\n\n  secret-b   bob  \nsecret-c alice\n")
    t = TokenTable.from_file(f)
    assert t.principal("secret-a") == "alice"
    assert t.principal("secret-b") == "bob"
    assert t.principal("secret-c") == "alice"
    assert t.principal("secret-") is None and t.principal("") is None
    assert t.principal("secret-a ") is None
    md = (("user-agent", "x"), ("authorization", "Bearer secret-b"))
    assert t.principal_from_metadata(md) == "bob"
    assert t.principal_from_metadata((("authorization", "bearer secret-a"),)) == "alice"
    assert t.principal_from_metadata((("authorization", "Basic secret-a"),)) is None
    assert t.principal_from_metadata((("authorization", "Bearer"),)) is None
    assert t.principal_from_metadata(()) is None
    # only digests are kept: the table holds no token text
    digests = set(t._principals)
    assert digests == {
        hashlib.sha256(s.encode()).digest() for s in ("secret-a", "secret-b", "secret-c")
    }


@pytest.mark.parametrize(
    "text, match",
    [
        ("only-a-token\n", r":1: expected '<token> <principal>'"),
        ("tok alice\ntok bob\n", r":2: duplicate token"),
        ("# nothing\n", r"tokens holds no '<token> <principal>' line"),
        ("tok alice\ntok\xff bob\n", r":2: not valid UTF-8$"),  # no byte of it quoted
        ("tok alice\ntok\x7f bob\n", r":2: the token must be visible ASCII"),  # DEL
    ],
)
def test_bad_token_file_names_the_line_not_the_token(tmp_path, text, match):
    f = tmp_path / "tokens"
    f.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=match) as e:
        TokenTable.from_file(f)
    assert "tok " not in str(e.value) and "only-a-token" not in str(e.value)
    assert str(e.value).startswith("auth_tokens: ")


@pytest.mark.parametrize("name", ["prefix_cache_mb", "rewind_memory_mb"])
def test_mib_settings_stop_below_2_to_the_20(name):
    assert getattr(ServerConfig(model_dir="m", **{name: 2**20 - 1}), name) == 2**20 - 1
    with pytest.raises(ValueError) as e:
        ServerConfig(model_dir="m", **{name: 2**20})
    assert str(e.value) == f"{name}: must be in [0, 2**20) MiB, got {2**20}"


def test_a_state_dir_with_a_shared_state_store_is_refused():
    with pytest.raises(ValueError) as e:
        ServerConfig(model_dir="m", state_store="redis://127.0.0.1:6379/0", state_dir="/tmp/s")
    assert str(e.value) == (
        "state_dir: sessions persist in --state-store; do not also give --state-dir"
    )
    assert ServerConfig(model_dir="m", state_store="redis://127.0.0.1:6379/0").state_dir is None


def test_token_table_refuses_empty_tokens_and_principals():
    for table in ({"tok-1": ""}, {"": "alice"}):
        with pytest.raises(ValueError) as e:
            TokenTable(table)
        assert str(e.value) == "auth_tokens: tokens and principals must be non-empty"


def test_only_the_first_authorization_entry_counts_whatever_its_scheme():
    t = TokenTable({"tok-bob": "bob"})
    assert t.principal_from_metadata((("authorization", "Bearer tok-bob"),)) == "bob"
    for first in ("Basic dXNlcjpwdw==", "tok-bob"):
        md = (("authorization", first), ("authorization", "Bearer tok-bob"))
        assert t.principal_from_metadata(md) is None


def test_zero_mib_turns_the_prefix_cache_and_the_rewind_memory_limit_off():
    """0 is the documented 'off' of --prefix-cache-mb ('0: off') and --rewind-memory-mb
    ('0: no limit'); it must be accepted, from Python and from argv."""
    c = ServerConfig(model_dir="m", prefix_cache_mb=0, rewind_memory_mb=0.0)
    assert (c.prefix_cache_mb, c.rewind_memory_mb) == (0, 0.0)
    c = parse_config(["m", "--prefix-cache-mb", "0", "--rewind-memory-mb", "0"])
    assert (c.prefix_cache_mb, c.rewind_memory_mb) == (0.0, 0.0)


def test_an_unknown_prefix_cache_scope_is_refused_in_python_too():
    """Argparse's choices guard only argv; a config built in Python is checked the same."""
    with pytest.raises(ValueError) as e:
        ServerConfig(model_dir="m", prefix_cache_scope="tenant")
    assert str(e.value) == "prefix_cache_scope: must be principal or global, got 'tenant'"
    assert ServerConfig(model_dir="m", prefix_cache_scope="global").prefix_cache_scope == "global"


def test_a_tls_redis_url_is_a_state_store():
    """Rediss:// (Redis over TLS) is accepted like redis:// and unix://."""
    for url in ("rediss://cache.example:6380/0", "redis://h:6379/1", "unix:///run/redis.sock"):
        assert ServerConfig(model_dir="m", state_store=url).state_store == url
    with pytest.raises(ValueError, match=r"^state_store: must be memory or a redis://"):
        ServerConfig(model_dir="m", state_store="http://h:6379")


NO_SCHEME = "a value that does not start with a scheme (such as redis://)"


@pytest.mark.parametrize(
    "url, shown",
    [
        ("Redis://:hunter2@h:6379/0", "one that starts 'Redis://'"),
        ("http://u:hunter2@h/0?password=hunter2", "one that starts 'http://'"),
        ("http://[::1:hunter2@h", "one that starts 'http://'"),
        (" redis://u:hunter2@h", "one that starts ' redis://'"),
        ("redis:/u:hunter2@h:6379", NO_SCHEME),  # mistyped: no URL a parser could hide it in
        ("redis//:hunter2@h", NO_SCHEME),
        ("u:hunter2@h:6379", NO_SCHEME),
        ("u:hunter2@h://0", NO_SCHEME),
    ],
)
def test_a_refused_state_store_url_is_said_without_its_password(url, shown):
    """The error is printed and logged: a URL refused for its scheme (Redis:// is not
    redis://) shows the scheme as written and nothing after it, so no password, whether or
    not the rest parses as a URL."""
    with pytest.raises(ValueError) as e:
        ServerConfig(model_dir="m", state_store=url)
    assert str(e.value) == (
        f"state_store: must be memory or a redis://host:port/db URL, got {shown} (the rest is "
        "not shown: it may hold a password)"
    )
    assert "hunter2" not in str(e.value)


@pytest.mark.parametrize(
    "value", ["0", "fast", "10s", "", "1000000001", "3600001ms", "9" * 400 + "ms", "9" * 5000]
)
def test_a_bad_persist_every_is_refused_when_the_config_is_built(value, capsys):
    """--persist-every is checked in ServerConfig (a usage error naming the flag), not
    only when a shared store starts; N is at most 10^9 steps or an hour of milliseconds (a
    400-digit interval overflowed a float, a 5000-digit one Python's int parsing, and any
    larger N wrote nothing a session would live to see)."""
    with pytest.raises(ValueError) as e:
        ServerConfig(model_dir="m", persist_every=value)
    assert str(e.value).startswith("persist_every: must be N (write every Nth step")
    assert str(e.value).endswith(f"got {value!r}")
    with pytest.raises(SystemExit) as ex:
        parse_config(["m", "--persist-every", value])
    assert ex.value.code == 2
    assert "--persist-every: must be N" in capsys.readouterr().err


def test_the_largest_persist_every_values_are_taken():
    assert ServerConfig(model_dir="m", persist_every="1000000000").persist_every == "1000000000"
    assert parse_config(["m", "--persist-every", "3600000ms"]).persist_every == "3600000ms"


def test_grace_zero_is_a_valid_stop_at_once():
    """--grace 0 (cancel in-flight calls at once) is allowed (>= 0), unlike --session-ttl 0."""
    assert ServerConfig(model_dir="m", grace=0).grace == 0
    assert parse_config(["m", "--grace", "0"]).grace == 0.0
    with pytest.raises(ValueError, match=r"^grace: must be >= 0 and <= 1e\+09 seconds, got -0.5$"):
        ServerConfig(model_dir="m", grace=-0.5)


def test_the_largest_values_the_server_can_hold_are_accepted():
    """The upper bounds are inclusive: port 65535, int32 / uint32 maxima."""
    c = ServerConfig(
        model_dir="m", port=65535, metrics_port=65534, max_message_bytes=2**31 - 1,
        max_concurrent_rpcs=2**31 - 1, max_sessions_per_principal=2**32 - 1,
        max_new_tokens=2**32 - 1, rewind_window=2**32 - 1,
    )  # fmt: skip
    assert (c.port, c.max_message_bytes, c.max_new_tokens) == (65535, 2**31 - 1, 2**32 - 1)
    with pytest.raises(ValueError) as e:
        ServerConfig(model_dir="m", max_message_bytes=2**31)
    assert str(e.value) == f"max_message_bytes: must be >= 1 and <= {2**31 - 1}, got {2**31}"


def test_help_shows_no_default_for_flags_whose_default_is_none():
    """A None default is described by the help text itself; '(default: None)' is not
    shown, while real defaults are."""
    from ssmstream.runtime.config import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "default: None" not in text and "default: False" not in text  # store_true flags
    assert "(default: 50051)" in text and "(default: memory)" in text
    assert "0: only at shutdown (default: 0.0)" in text  # --save-interval: 0.0 == False


def test_every_flag_with_a_default_states_it_in_its_help():
    # --max-message-bytes showed none: its help said "by default", which hid "(default: …)"
    from ssmstream.model.train import build_parser as train_parser
    from ssmstream.runtime.config import build_parser as serve_parser

    for parser in (serve_parser(), train_parser()):
        formatter = parser._get_formatter()
        for a in parser._actions:
            if a.default in (None, False, argparse.SUPPRESS) or not a.option_strings:
                continue
            said = formatter._expand_help(a)
            assert any(w in said for w in ("(default", "default:", "; default")), (a.dest, said)


@pytest.mark.parametrize(
    "name, message",
    [
        ("session_ttl", "must be a finite number of seconds, got True"),
        ("grace", "must be a finite number of seconds, got True"),
        ("prefix_cache_mb", r"must be in \[0, 2\*\*20\) MiB, got True"),
        ("rewind_memory_mb", r"must be in \[0, 2\*\*20\) MiB, got True"),
        ("lease_ttl", r"must be in \[0.05, 3600\] seconds, got True"),
    ],
)
def test_a_bool_is_not_a_number_of_seconds_or_mebibytes(name, message):
    """From Python, True would pass as 1 (bool is an int); the integer settings refuse it,
    and so do the number ones."""
    with pytest.raises(ValueError, match=rf"^{name}: {message}$"):
        ServerConfig(model_dir="m", **{name: True})
    assert getattr(ServerConfig(model_dir="m", **{name: 1}), name) == 1


# --lease-ttl takes the documented closed range [0.05, 3600] seconds.
@pytest.mark.parametrize("ttl", [0.05, 3600, 3600.0])
def test_lease_ttl_bounds_are_inclusive(ttl):
    assert ServerConfig(model_dir="m", lease_ttl=ttl).lease_ttl == ttl


@pytest.mark.parametrize("ttl", [0.0499, 3600.001, float("nan")])
def test_lease_ttl_outside_the_range_is_refused(ttl):
    with pytest.raises(ValueError, match=r"^lease_ttl: must be in \[0.05, 3600\] seconds"):
        ServerConfig(model_dir="m", lease_ttl=ttl)


# a port one past the largest (65536) is refused naming the flag, not left to bind().
@pytest.mark.parametrize("name", ["port", "metrics_port"])
def test_port_65536_is_refused(name):
    with pytest.raises(ValueError, match=f"^{name}: must be >= 0 and <= 65535, got 65536$"):
        ServerConfig(model_dir="m", **{name: 65536})


# the integer settings whose 0 means "off" accept 0 (and refuse -1).
@pytest.mark.parametrize(
    "name", ["rewind_window", "max_sessions_per_principal", "max_concurrent_rpcs"]
)
def test_zero_is_accepted_and_minus_one_refused(name):
    assert getattr(ServerConfig(model_dir="m", **{name: 0}), name) == 0
    with pytest.raises(ValueError, match=f"^{name}: must be >= 0"):
        ServerConfig(model_dir="m", **{name: -1})


def test_rewind_window_zero_from_the_command_line_turns_rewind_off():
    assert parse_config(["m", "--rewind-window", "0"]).rewind_window == 0


# A --state-store URL that passes the flag check (it starts with redis://) but that the
# redis client refuses (a port that is not a number) ends `ssmstream serve` with exit status 2
# and one error line naming the flag and the URL, not a traceback.
def test_a_store_url_the_redis_client_refuses_exits_2_naming_it(toy_token_model, caplog):
    caplog.set_level(logging.ERROR, logger=server_module.__name__)
    argv = [
        str(toy_token_model["model_dir"]), "--host", "127.0.0.1", "--port", "0",
        "--device", "cpu", "--state-store", "redis://127.0.0.1:notaport/0",
    ]  # fmt: skip
    assert server_module.main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors  # the redis client's words between the flag and the URL
    assert errors[0].startswith("ssmstream serve: --state-store: ")
    assert errors[0].endswith(" (in redis://127.0.0.1:notaport/0)")


# The state store's URL goes into logs and errors with its password hidden: the one in the
# userinfo (redis://:PASSWORD@host) and the one given as a query parameter (?password=...).
def test_a_password_given_as_a_query_parameter_is_hidden():
    url = "redis://127.0.0.1:6379/0?password=hunter2&socket_keepalive=true"
    assert without_password(url) == "redis://127.0.0.1:6379/0?password=***&socket_keepalive=true"
    backend = RedisBackend(url)  # connects lazily
    assert "hunter2" not in backend.url
    assert "hunter2" not in str(backend._reset())
    assert backend.url.startswith("redis://127.0.0.1:6379/0?")


def test_both_passwords_are_hidden_and_a_url_without_one_is_unchanged():
    url = "rediss://app:s3cret@redis.internal:6380/2?password=other"
    assert without_password(url) == "rediss://app:***@redis.internal:6380/2?password=***"
    plain = "redis://127.0.0.1:6379/0?db=1"
    assert without_password(plain) == plain


# A tokens file the server may not read (root-owned, mode 600, a server running as another
# user) ends `ssmstream serve` with one error line naming --auth-tokens and the file, before
# the model loads, as an unreadable --snapshot-key or --tls-key does.
def test_a_tokens_file_that_cannot_be_read_exits_2_naming_the_flag(
    toy_token_model, tmp_path, monkeypatch, caplog
):
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-a alice\n")
    real_read = server_module.Path.read_bytes

    def read_bytes(self):  # a test run as root reads past any mode: refused here instead
        if self == tokens:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(server_module.Path, "read_bytes", read_bytes)
    with pytest.raises(ValueError) as e:
        TokenTable.from_file(tokens)
    assert str(e.value) == f"auth_tokens: cannot read {tokens}: Permission denied"
    caplog.set_level(logging.INFO)
    argv = [
        str(toy_token_model["model_dir"]), "--port", "0", "--device", "cpu",
        "--auth-tokens", str(tokens),
    ]  # fmt: skip
    assert server_module.main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"ssmstream serve: --auth-tokens: cannot read {tokens}: Permission denied"]
    assert not any(r.getMessage().startswith("opened ") for r in caplog.records)  # not loaded
