"""Tests for docker.sh that need no Docker daemon.

A fake `docker` placed first on PATH records every call and answers the way
the real client would, so we can check what docker.sh asks Docker to do.
"""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "docker.sh"
PASSWORD = "s3cret-xyz"

# Behaviour knobs (environment variables read by the fake):
#   FAKE_INFO_RC     exit code of `docker info` (0 = daemon reachable)
#   FAKE_READY_AFTER the Nth `docker exec` succeeds; 0 = never
FAKE_DOCKER = r"""#!/usr/bin/env bash
log="$FAKE_LOG"
printf '%q ' "$@" >>"$log"
printf '\n' >>"$log"
case "$1" in
    info) exit "${FAKE_INFO_RC:-0}" ;;
    run)
        # Record what the container would see from `-e NAME` pass-through.
        env | grep '^CLICKHOUSE_' | sort >"$log.run-env"
        echo 0123456789abcdef
        ;;
    exec)
        count=$(( $(cat "$log.exec-count" 2>/dev/null || echo 0) + 1 ))
        echo "$count" >"$log.exec-count"
        ready_after="${FAKE_READY_AFTER:-1}"
        if [[ "$ready_after" -eq 0 || "$count" -lt "$ready_after" ]]; then
            echo "Code: 210. Connection refused" >&2
            exit 1
        fi
        echo 1
        ;;
esac
exit 0
"""


@pytest.fixture
def fake_docker(tmp_path):
    """Return a function that runs docker.sh against the fake docker."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "docker"
    fake.write_text(FAKE_DOCKER)
    fake.chmod(0o755)
    log = tmp_path / "docker.log"

    def run(*args, **env_overrides):
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLICKHOUSE_")}
        env.update(
            PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            FAKE_LOG=str(log),
            CLICKHOUSE_PASSWORD=PASSWORD,
        )
        env.update(env_overrides)
        result = subprocess.run(
            [str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=20
        )
        calls = [shlex.split(line) for line in read_lines(log)]
        run_env = dict(line.split("=", 1) for line in read_lines(Path(f"{log}.run-env")))
        return result, calls, run_env

    return run


def read_lines(path):
    return path.read_text().splitlines() if path.exists() else []


def only_call(calls, subcommand):
    matching = [c for c in calls if c[:1] == [subcommand]]
    assert len(matching) == 1, f"expected one `docker {subcommand}`, got {calls}"
    return matching[0]


def option_values(argv, flag):
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


def test_shellcheck_is_clean():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is not installed (apt-get install shellcheck)"
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_script_is_executable():
    assert os.access(SCRIPT, os.X_OK)


def test_start_runs_pinned_clickhouse_on_localhost_and_waits(fake_docker):
    result, calls, run_env = fake_docker("start", FAKE_READY_AFTER="2")
    assert result.returncode == 0, result.stderr

    run = only_call(calls, "run")
    image = run[-1]
    assert re.fullmatch(r"clickhouse/clickhouse-server:\d+\.\d+", image), image
    assert "latest" not in image

    assert option_values(run, "--name") == ["perspective-clickhouse"]
    # HTTP only: nothing here speaks the native protocol.
    assert sorted(option_values(run, "-p")) == ["127.0.0.1:8123:8123"]
    assert option_values(run, "-v") == ["perspective-clickhouse-data:/var/lib/clickhouse"]
    assert "nofile=262144:262144" in option_values(run, "--ulimit")

    passed = option_values(run, "-e")
    for name in ("CLICKHOUSE_DB", "CLICKHOUSE_USER", "CLICKHOUSE_PASSWORD"):
        assert name in passed
    assert "CLICKHOUSE_DEFAULT_ACCESS_MANAGEMENT=1" in passed
    # Defaults match the Python scripts; the password comes from our environment.
    assert run_env["CLICKHOUSE_DB"] == "demo"
    assert run_env["CLICKHOUSE_USER"] == "demo"
    assert run_env["CLICKHOUSE_PASSWORD"] == PASSWORD

    # The old container goes first, then the new one, then the readiness polls.
    assert calls.index(["rm", "-f", "perspective-clickhouse"]) < calls.index(run)
    polls = [c for c in calls if c[:1] == ["exec"]]
    assert len(polls) == 2, polls
    assert all("clickhouse-client" in c and "SELECT 1" in c for c in polls)
    assert calls.index(run) < calls.index(polls[0])

    assert "http://localhost:8123" in result.stdout
    assert "python producer.py" in result.stdout
    assert "python perspective_server.py" in result.stdout
    assert "http://localhost:8080" in result.stdout
    assert "CLICKHOUSE_PORT" not in result.stdout  # no port hint at the default


def test_password_is_never_printed_or_put_on_a_command_line(fake_docker):
    result, calls, _ = fake_docker()
    assert result.returncode == 0, result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    assert not any(PASSWORD in arg for call in calls for arg in call)


def test_ports_names_and_volume_can_be_overridden(fake_docker):
    result, calls, _ = fake_docker(
        CLICKHOUSE_HTTP_PORT="18123",
        CLICKHOUSE_NATIVE_PORT="19000",
        CLICKHOUSE_CONTAINER="other",
        CLICKHOUSE_IMAGE="clickhouse/clickhouse-server:25.3",
        CLICKHOUSE_VOLUME="",
    )
    assert result.returncode == 0, result.stderr
    run = only_call(calls, "run")
    assert run[-1] == "clickhouse/clickhouse-server:25.3"
    assert option_values(run, "--name") == ["other"]
    assert sorted(option_values(run, "-p")) == ["127.0.0.1:18123:8123", "127.0.0.1:19000:9000"]
    assert option_values(run, "-v") == []
    assert "http://localhost:18123" in result.stdout
    assert "CLICKHOUSE_PORT=18123" in result.stdout  # what the Python scripts read


def test_stop_removes_the_container_but_not_the_volume(fake_docker):
    result, calls, _ = fake_docker("stop")
    assert result.returncode == 0, result.stderr
    assert ["rm", "-f", "perspective-clickhouse"] in calls
    assert not any(c[:1] == ["run"] or c[:2] == ["volume", "rm"] for c in calls)


def test_missing_docker_prints_one_line_pointing_to_embedded(tmp_path):
    # docker lives in /usr/local/bin here; bash and env are in /usr/bin and /bin.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    assert shutil.which("docker", path=env["PATH"]) is None
    result = subprocess.run(
        [str(SCRIPT)], env=env, capture_output=True, text=True, timeout=10
    )
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "--embedded" in lines[0]


def test_unreachable_daemon_prints_one_line(fake_docker):
    result, calls, _ = fake_docker(FAKE_INFO_RC="1")
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "daemon" in lines[0] and "--embedded" in lines[0]
    assert not any(c[:1] == ["run"] for c in calls)


def test_readiness_timeout_fails_and_points_to_docker_logs(fake_docker):
    result, calls, _ = fake_docker(FAKE_READY_AFTER="0", CLICKHOUSE_WAIT_SECONDS="2")
    assert result.returncode != 0
    assert "docker logs perspective-clickhouse" in result.stderr
    assert "2s" in result.stderr
    assert len([c for c in calls if c[:1] == ["exec"]]) >= 2


def test_help_prints_usage(fake_docker):
    for arg in ("help", "-h"):
        result, calls, _ = fake_docker(arg)
        assert result.returncode == 0
        assert "usage:" in result.stdout
        assert calls == []


def test_unknown_subcommand_exits_2_with_usage_on_stderr(fake_docker):
    result, calls, _ = fake_docker("bogus")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "usage:" in result.stderr
    assert calls == []
