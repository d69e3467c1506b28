"""Settings: flags, CLICKHOUSE_* defaults, and errors a user can act on.

producer.parse_args and perspective_server.parse_args turn the command line
(and the environment) into typed settings. Bad values end the script the
way argparse does: exit code 2 and one error line naming the flag.
"""

import pytest

import perspective_server
import producer
from connection import ClickHouseSettings
from perspective_server import ServerSettings
from producer import ProducerSettings

PASSWORD = "s3cret-Pa55word"
ENVIRONMENT = ("CLICKHOUSE_URL", "CLICKHOUSE_HOST", "CLICKHOUSE_PORT", "CLICKHOUSE_USER",
               "CLICKHOUSE_PASSWORD", "CLICKHOUSE_DB", "CLICKHOUSE_SECURE", "CLICKHOUSE_WAIT", "CHDB_PATH")
SCRIPTS = {"producer": producer.parse_args, "server": perspective_server.parse_args}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """Each test starts as if no CLICKHOUSE_* variable were set."""
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


def error_line(capsys) -> str:
    """The single 'error:' line argparse printed; fails if there is not exactly one."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


# --- defaults ----------------------------------------------------------------


def test_producer_defaults():
    settings, ch = producer.parse_args([])
    assert settings == ProducerSettings(interval=0.5, batch_size=100, max_pending_rows=1_000_000,
                                        seed=None, table="stock_values")
    assert ch == ClickHouseSettings()


def test_server_defaults():
    settings, ch = perspective_server.parse_args([])
    assert settings == ServerSettings(port=8080, bind="127.0.0.1", interval=0.1, limit=30_000,
                                      overlap=3.0, table="stock_values", cursor="inserted_at", key="id")
    assert ch == ClickHouseSettings()


def test_connection_defaults_match_docker_sh():
    ch = ClickHouseSettings()
    assert (ch.host, ch.port, ch.username, ch.password, ch.database) == (
        "localhost", 8123, "demo", "demo", "demo")
    assert not ch.secure and not ch.embedded


# --- flags override ------------------------------------------------------------


def test_producer_flags_override_defaults():
    settings, _ = producer.parse_args(["--interval", "2", "--batch-size", "1000",
                                       "--max-pending-rows", "5000", "--seed", "7", "--table", "trades"])
    assert settings == ProducerSettings(interval=2.0, batch_size=1000, max_pending_rows=5000,
                                        seed=7, table="trades")


def test_server_flags_override_defaults():
    settings, _ = perspective_server.parse_args([
        "--port", "9000", "--bind", "0.0.0.0", "--interval", "1", "--limit", "500",
        "--overlap", "0", "--check-every", "0", "--table", "trades", "--cursor", "arrived", "--key", "trade_id"])
    assert settings == ServerSettings(port=9000, bind="0.0.0.0", interval=1.0, limit=500, overlap=0.0,
                                      table="trades", cursor="arrived", key="trade_id", check_every=0.0)


def test_empty_key_means_compare_whole_rows():
    settings, _ = perspective_server.parse_args(["--key", ""])
    assert settings.key == ""


@pytest.mark.parametrize("parse_args", SCRIPTS.values(), ids=SCRIPTS.keys())
def test_connection_flags_override_the_environment(parse_args, monkeypatch):
    monkeypatch.setenv("CLICKHOUSE_URL", f"http://alice:{PASSWORD}@ch.example:8124/market")
    monkeypatch.setenv("CLICKHOUSE_HOST", "env-host")
    _, ch = parse_args(["--ch-host", "flag-host", "--ch-port", "9999", "--ch-user", "bob",
                        "--ch-database", "flagdb", "--ch-secure", "--wait", "0"])
    assert (ch.host, ch.port, ch.username, ch.database, ch.secure, ch.wait) == (
        "flag-host", 9999, "bob", "flagdb", True, 0.0)
    assert ch.password == PASSWORD  # only the environment sets it


# --- environment ---------------------------------------------------------------


@pytest.mark.parametrize("parse_args", SCRIPTS.values(), ids=SCRIPTS.keys())
def test_clickhouse_variables_fill_the_connection(parse_args, monkeypatch):
    monkeypatch.setenv("CLICKHOUSE_HOST", "db.internal")
    monkeypatch.setenv("CLICKHOUSE_PORT", "18123")
    monkeypatch.setenv("CLICKHOUSE_USER", "carol")
    monkeypatch.setenv("CLICKHOUSE_PASSWORD", PASSWORD)
    monkeypatch.setenv("CLICKHOUSE_DB", "markets")
    _, ch = parse_args([])
    assert (ch.host, ch.port, ch.username, ch.password, ch.database, ch.secure) == (
        "db.internal", 18123, "carol", PASSWORD, "markets", False)


@pytest.mark.parametrize("parse_args", SCRIPTS.values(), ids=SCRIPTS.keys())
def test_clickhouse_url_sets_everything_at_once(parse_args, monkeypatch):
    monkeypatch.setenv("CLICKHOUSE_URL", "http://alice:pw@ch.example:8124/market")
    _, ch = parse_args([])
    assert (ch.host, ch.port, ch.username, ch.password, ch.database, ch.secure) == (
        "ch.example", 8124, "alice", "pw", "market", False)


def test_an_https_url_means_a_secure_connection(monkeypatch):
    monkeypatch.setenv("CLICKHOUSE_URL", "https://alice:pw@ch.example:8443/market")
    _, ch = producer.parse_args([])
    assert ch.secure and ch.port == 8443
    assert ch.address == "https://ch.example:8443"


def test_url_credentials_are_percent_decoded(monkeypatch):
    # '@', ':' and '/' must be percent-encoded inside a URL; the server expects
    # the decoded password, as clickhouse-connect's own dsn= parsing gives it.
    monkeypatch.setenv("CLICKHOUSE_URL", "http://al%40ice:p%40ss%3Aw%2Frd@ch.example:8124/market")
    _, ch = producer.parse_args([])
    assert (ch.username, ch.password) == ("al@ice", "p@ss:w/rd")


def test_parts_missing_from_the_url_come_from_the_other_variables(monkeypatch):
    monkeypatch.setenv("CLICKHOUSE_URL", "http://ch.example")
    monkeypatch.setenv("CLICKHOUSE_PORT", "18123")
    monkeypatch.setenv("CLICKHOUSE_USER", "carol")
    _, ch = producer.parse_args([])
    assert (ch.host, ch.port, ch.username, ch.database) == ("ch.example", 18123, "carol", "demo")


# --- bad values ---------------------------------------------------------------------


@pytest.mark.parametrize("parse_args, argv, flag", [
    (producer.parse_args, ["--interval", "0"], "--interval"),
    (producer.parse_args, ["--batch-size", "0"], "--batch-size"),
    (producer.parse_args, ["--batch-size", "10", "--max-pending-rows", "5"], "--max-pending-rows"),
    (producer.parse_args, ["--ch-port", "abc"], "--ch-port"),
    (producer.parse_args, ["--ch-port", "70000"], "--ch-port"),
    (producer.parse_args, ["--wait", "-1"], "--wait"),
    (perspective_server.parse_args, ["--interval", "0"], "--interval"),
    (perspective_server.parse_args, ["--port", "70000"], "--port"),
    (perspective_server.parse_args, ["--port", "0"], "--port"),
    (perspective_server.parse_args, ["--limit", "0"], "--limit"),
    (perspective_server.parse_args, ["--overlap", "-1"], "--overlap"),
    (perspective_server.parse_args, ["--check-every", "-1"], "--check-every"),
    (perspective_server.parse_args, ["--ch-port", "abc"], "--ch-port"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_a_bad_value_exits_with_code_2_and_one_line_naming_the_flag(parse_args, argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    assert flag in error_line(capsys)


def test_a_bad_port_in_the_environment_names_the_flag(monkeypatch, capsys):
    monkeypatch.setenv("CLICKHOUSE_PORT", "abc")
    with pytest.raises(SystemExit) as exit_:
        producer.parse_args([])
    assert exit_.value.code == 2
    assert "--ch-port" in error_line(capsys)


# --- the password stays secret -----------------------------------------------------------


@pytest.mark.parametrize("parse_args", SCRIPTS.values(), ids=SCRIPTS.keys())
@pytest.mark.parametrize("variable, value", [
    ("CLICKHOUSE_PASSWORD", PASSWORD),
    ("CLICKHOUSE_URL", f"http://alice:{PASSWORD}@ch.example:8124/market"),
])
def test_the_password_is_not_in_help(parse_args, variable, value, monkeypatch, capsys):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--ch-host" in out  # the help really was printed
    assert PASSWORD not in out


def test_there_is_no_password_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        producer.parse_args(["--ch-password", PASSWORD])
    assert exit_.value.code == 2


@pytest.mark.parametrize("embedded", [False, True])
def test_describe_never_includes_the_password(embedded):
    ch = ClickHouseSettings(host="ch.example", username="alice", password=PASSWORD, embedded=embedded)
    line = ch.describe()
    assert PASSWORD not in line
    assert "\n" not in line


def test_describe_names_where_and_who():
    ch = ClickHouseSettings(host="ch.example", port=8124, username="alice", password=PASSWORD, database="market")
    assert ch.describe() == "ClickHouse: http://ch.example:8124, user alice, database market"


# --- embedded chDB belongs to the server only ------------------------------------------------


def test_the_server_accepts_embedded_and_chdb_path():
    _, ch = perspective_server.parse_args(["--embedded", "--chdb-path", ":memory:"])
    assert ch.embedded and ch.chdb_path == ":memory:"


def test_the_server_is_not_embedded_unless_asked():
    _, ch = perspective_server.parse_args([])
    assert not ch.embedded and ch.chdb_path == "chdb-data"


@pytest.mark.parametrize("argv", [["--embedded"], ["--chdb-path", "data"]])
def test_the_producer_has_no_embedded_flags(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        producer.parse_args(argv)
    assert exit_.value.code == 2
    assert argv[0] in error_line(capsys)
    assert "--embedded" not in _help(producer.parse_args, capsys)


def test_the_server_help_mentions_embedded(capsys):
    help_text = _help(perspective_server.parse_args, capsys)
    assert "--embedded" in help_text and "--chdb-path" in help_text


def _help(parse_args, capsys) -> str:
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    return capsys.readouterr().out
