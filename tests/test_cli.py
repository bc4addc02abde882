"""The ``theta`` command line, run for real in subprocesses on loopback.

Every wait is bounded: subprocess timeouts, and the server's ``listening on`` line is read
with a deadline (no sleeps).
"""

from __future__ import annotations

import contextlib
import importlib
import ipaddress
import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from theta._cli import build_parser

THETA = [sys.executable, "-m", "theta"]
TIMEOUT = 20.0  # seconds for any one command


def theta(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m theta ARGS`` to completion."""
    return subprocess.run(
        [*THETA, *args], capture_output=True, text=True, timeout=TIMEOUT, env=env, check=False
    )


def read_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    """The first line ``process`` writes to stdout, within ``timeout`` seconds."""
    assert process.stdout is not None
    fd, data, deadline = process.stdout.fileno(), b"", time.monotonic() + timeout
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        readable, _, _ = select.select([fd], [], [], max(remaining, 0))
        if not readable:
            raise AssertionError(f"no line on stdout within {timeout} s (got {data!r})")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise AssertionError(f"stdout ended before a full line (got {data!r})")
        data += chunk
    return data.split(b"\n", 1)[0].decode()


@contextlib.contextmanager
def echo_server(
    certificate: tuple[Path, Path], listen: str = "127.0.0.1:0", *extra: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A running ``theta echo-server``; yields it and its ``listening on`` line."""
    cert, key = certificate
    command = [*THETA, "echo-server", "--listen", listen, "--cert", str(cert), "--key", str(key)]
    with subprocess.Popen(
        [*command, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        try:
            yield process, read_line(process, timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=TIMEOUT)


def port_of(line: str) -> str:
    match = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)", line)
    assert match, line
    assert int(match[1]) > 0
    return match[1]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``theta cert --name localhost``: the certificate and key files."""
    directory = tmp_path_factory.mktemp("cert")
    cert, key = directory / "cert.pem", directory / "key.pem"
    result = theta("cert", "--name", "localhost", "--cert-out", str(cert), "--key-out", str(key))
    assert result.returncode == 0, result.stderr
    assert "localhost" in result.stdout
    return cert, key


@pytest.fixture(scope="module")
def server_port(certificate: tuple[Path, Path]) -> Iterator[str]:
    """The port of one echo server shared by the client tests."""
    with echo_server(certificate) as (_, line):
        yield port_of(line)


def echo_client(
    certificate: tuple[Path, Path], port: str, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cert, _ = certificate
    connect = ["--connect", f"127.0.0.1:{port}", "--server-name", "localhost"]
    return theta("echo-client", *connect, "--ca", str(cert), *extra, env=env)


def test_cert_writes_certificate_and_private_key(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    names = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(names.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_cert_for_an_ip_address_certifies_it_as_an_address(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    result = theta("cert", "--name", "192.0.2.7", "--cert-out", str(cert), "--key-out", str(key))
    assert result.returncode == 0, result.stderr
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    names = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == []
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == [
        "192.0.2.7",
        "127.0.0.1",
        "::1",
    ]


def test_cert_writes_both_files_or_neither(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_bytes(b"old")
    key.chmod(0o644)
    for cert_out in (tmp_path / "missing" / "c.pem", tmp_path):  # no folder; a folder
        result = theta("cert", "--name", "x", "--cert-out", str(cert_out), "--key-out", str(key))
        assert result.returncode == 2, result.stderr
        assert "cannot write --cert-out" in result.stderr
        assert key.read_bytes() == b"old"  # the existing key is left as it was
    assert [path.name for path in tmp_path.iterdir()] == ["k.pem"]  # no temporary left
    cert = tmp_path / "c.pem"
    result = theta("cert", "--name", "x", "--cert-out", str(cert), "--key-out", str(key))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert.stat().st_mode) == 0o644
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_cert_with_a_directory_for_the_key_changes_nothing(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_bytes(b"old cert")
    folder = tmp_path / "keys"
    folder.mkdir()
    result = theta("cert", "--name", "x", "--cert-out", str(cert), "--key-out", str(folder))
    assert result.returncode == 2, result.stderr
    assert "cannot write --key-out" in result.stderr
    assert cert.read_bytes() == b"old cert"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["c.pem", "keys"]


def test_cert_puts_the_first_file_back_when_the_second_cannot_be_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from theta._cli._common import CommandFailed

    cert_module = importlib.import_module("theta._cli._cert")  # (theta._cli.cert: the command)

    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_bytes(b"old cert")
    replace = os.replace
    calls: list[str] = []

    def second_fails(source: str, target: str) -> None:
        calls.append(target)
        if len(calls) == 2:
            raise PermissionError(1, "Operation not permitted")
        replace(source, target)

    monkeypatch.setattr(cert_module.os, "replace", second_fails)
    files = [
        (str(cert), b"new cert", 0o644, "--cert-out"),
        (str(key), b"new key", 0o600, "--key-out"),
    ]
    with pytest.raises(CommandFailed, match="cannot write --key-out"):
        cert_module._write_pair(files)
    assert cert.read_bytes() == b"old cert"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["c.pem"]


def test_cert_writes_through_a_symbolic_link(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    key = tmp_path / "k.pem"
    key.symlink_to(tmp_path / "real" / "key.pem")
    cert = tmp_path / "c.pem"
    result = theta("cert", "--name", "x", "--cert-out", str(cert), "--key-out", str(key))
    assert result.returncode == 0, result.stderr
    assert key.is_symlink()
    assert (tmp_path / "real" / "key.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--name", "ex*ample..com"], "invalid --name: 'ex*ample..com' is not a DNS name"),
        (["--name", "x", "--days", "36501"], "invalid --days 36501: at most 36500"),
        (["--name", "x", "--key-out", "c.pem"], "--cert-out and --key-out name the same file"),
    ],
)
def test_cert_refuses_what_it_cannot_write(extra: list[str], message: str, tmp_path: Path) -> None:
    outputs = ["--cert-out", str(tmp_path / "c.pem"), "--key-out", str(tmp_path / "k.pem")]
    if "--key-out" in extra:
        extra = [*extra[:-1], str(tmp_path / extra[-1])]
        outputs = outputs[:2]
    result = theta("cert", *outputs, *extra)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"theta cert: error: {message}"]
    assert not (tmp_path / "k.pem").exists()


def test_echo_client_round_trip(certificate: tuple[Path, Path], server_port: str) -> None:
    result = echo_client(certificate, server_port, "--messages", "50", "--asset-size", "300000")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: 50 messages and a 300000-byte asset echoed intact")
    assert result.stderr == ""


def test_echo_client_writes_tls_key_log(
    certificate: tuple[Path, Path], server_port: str, tmp_path: Path
) -> None:
    key_log = tmp_path / "keys.log"
    env = {**os.environ, "SSLKEYLOGFILE": str(key_log)}
    result = echo_client(certificate, server_port, "--messages", "1", "--asset-size", "0", env=env)
    assert result.stdout.startswith("ok: 1 message and a 0-byte asset"), result.stdout
    assert result.returncode == 0, result.stderr
    assert "CLIENT_HANDSHAKE_TRAFFIC_SECRET" in key_log.read_text()


@pytest.mark.parametrize(
    "case",
    [
        ('{"Position": "x:f32,y:f32"}', 3, "SCHEMA_MISMATCH"),  # the server's schema differs
        ('["not", "an", "object"]', 2, "--manifest"),  # a usage error
    ],
)
def test_manifest_problems_exit_with_one_line(
    certificate: tuple[Path, Path], server_port: str, tmp_path: Path, case: tuple[str, int, str]
) -> None:
    manifest_text, returncode, said = case
    manifest = tmp_path / "manifest.json"
    manifest.write_text(manifest_text)
    result = echo_client(certificate, server_port, "--manifest", str(manifest))
    assert result.returncode == returncode
    assert len(result.stderr.splitlines()) == 1
    assert said in result.stderr


def test_wrong_ca_fails_with_one_line(
    certificate: tuple[Path, Path], server_port: str, tmp_path: Path
) -> None:
    other = tmp_path / "other.pem"
    result = theta(
        "cert", "--name", "localhost", "--cert-out", str(other), "--key-out", str(tmp_path / "k")
    )
    assert result.returncode == 0, result.stderr
    result = echo_client((other, other), server_port)
    assert result.returncode == 4
    assert len(result.stderr.splitlines()) == 1
    assert "QUIC/TLS error 0x12a:" in result.stderr
    assert result.stderr.rstrip().endswith("(TLS bad_certificate)")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_listen_address_is_printed_bracketed(certificate: tuple[Path, Path]) -> None:
    with echo_server(certificate, "[::1]:0") as (_, line):
        match = re.fullmatch(r"listening on \[::1\]:(\d+)", line)
        assert match, line
        result = theta(
            "echo-client", "--connect", f"[::1]:{match[1]}", "--ca", str(certificate[0]),
            "--messages", "3", "--asset-size", "1000",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr


def test_sigint_stops_the_server_with_130(certificate: tuple[Path, Path]) -> None:
    with echo_server(certificate) as (process, line):
        port_of(line)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=5)
        assert process.returncode == 130
        assert b"Traceback" not in stderr


def test_demo_runs_and_prints_a_summary() -> None:
    result = theta("demo", "--duration", "2")
    assert result.returncode == 0, result.stderr
    assert "summary after" in result.stdout
    assets = next(line for line in result.stdout.splitlines() if line.startswith("  assets "))
    assert re.search(r"[1-9]\d* echoed back \(.*B, 0 mismatched\)", assets), assets
    assert "client" in result.stdout
    assert "Traceback" not in result.stderr


def test_local_problems_are_usage_errors_not_connection_errors(
    certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = certificate
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        listen = ["--listen", f"127.0.0.1:{port}", "--cert", str(cert), "--key", str(key)]
        result = theta("echo-server", *listen)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"theta echo-server: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    key_log = tmp_path / "missing" / "keys.log"
    env = {**os.environ, "SSLKEYLOGFILE": str(key_log)}
    result = theta("demo", "--duration", "1", env=env)
    assert result.returncode == 2, result.stderr
    assert f"cannot write the TLS key log {key_log} (SSLKEYLOGFILE)" in result.stderr


def test_inconsistent_options_are_a_usage_error(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    result = theta(
        "echo-server", "--listen", "127.0.0.1:0", "--cert", str(cert), "--key", str(key),
        "--heartbeat-interval", "6",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "theta echo-server: error: --heartbeat-interval must be shorter than --heartbeat-timeout"
    ]
    many = [arg for value in range(1, 65) for arg in ("--capability", str(value))]
    result = theta("echo-client", "--connect", "127.0.0.1:1", "--ca", str(cert), *many)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "theta echo-client: error: --capability (plus zstd) must hold at most 64 values, not 65"
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cert", "--days", "0"], "argument --days: expected a positive integer, got '0'"),
        (["demo", "--rate", "0"], "argument --rate: a rate must be positive, got '0'"),
        (
            ["echo-client", "--connect", "127.0.0.1:0", "--ca", "ca.pem"],
            "argument --connect: invalid port in '127.0.0.1:0' (1..65535)",
        ),
        (
            ["echo-client", "--connect", "127.0.0.1:99999", "--ca", "ca.pem"],
            "argument --connect: invalid port in '127.0.0.1:99999' (1..65535)",
        ),
        (
            ["echo-client", "--connect", "127.0.0.1:\u00b2", "--ca", "ca.pem"],
            "argument --connect: invalid port in '127.0.0.1:\u00b2' (1..65535)",
        ),
        (
            ["echo-client", "--connect", "127.0.0.1:" + "9" * 5000, "--ca", "ca.pem"],
            f"argument --connect: invalid port in '127.0.0.1:{'9' * 5000}' (1..65535)",
        ),
        (
            ["echo-client", "--connect", "127.0.0.1:1", "--ca", "ca.pem", "--messages", "\u00b2"],
            "argument --messages: expected a non-negative integer, got '\u00b2'",
        ),
        (
            ["demo", "--asset-size", "67108865"],
            "argument --asset-size: at most 67108864 bytes (a peer's default limit),"
            " got '67108865'",
        ),
        (
            ["echo-client", "--connect", "127.0.0.1:1", "--ca", "ca.pem", "--messages", "10**9"],
            "argument --messages: expected a non-negative integer, got '10**9'",
        ),
        (
            ["echo-client", "--connect", "127.0.0.1:1", "--ca", "ca.pem", "--messages", "1000001"],
            "argument --messages: at most 1000000 messages, got '1000001'",
        ),
    ],
)
def test_values_out_of_range_are_refused_by_the_parser(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(message)


def test_unusable_tls_material_is_a_usage_error(
    certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = certificate
    other_cert, other_key = tmp_path / "other.pem", tmp_path / "other-key.pem"
    result = theta(
        "cert", "--name", "localhost", "--cert-out", str(other_cert), "--key-out", str(other_key)
    )
    assert result.returncode == 0, result.stderr
    result = theta(
        "echo-server", "--listen", "127.0.0.1:0", "--cert", str(cert), "--key", str(other_key)
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "theta echo-server: error: --key does not match the --cert (its first entry)"
    ]
    result = theta("echo-client", "--connect", "127.0.0.1:1", "--ca", str(key))
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("theta echo-client: error: --ca: no usable PEM certificates")
    env = dict(os.environ, SSLKEYLOGFILE=str(tmp_path / "no-such-dir" / "keys.log"))
    result = theta("echo-client", "--connect", "127.0.0.1:1", "--ca", str(cert), env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"theta echo-client: error: cannot write the TLS key log {env['SSLKEYLOGFILE']}"
        " (SSLKEYLOGFILE): No such file or directory"
    ]


def test_ctrl_c_while_importing_exits_130_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.abc

    from theta.__main__ import run

    class Interrupted(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, *args: object) -> None:
            if name == "theta._cli":
                raise KeyboardInterrupt

    monkeypatch.delitem(sys.modules, "theta._cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Interrupted(), *sys.meta_path])
    assert run() == 130


def test_an_unresolvable_host_is_reported_as_such() -> None:
    from theta._cli._common import EXIT_TRANSPORT, describe

    error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert describe(error) == (
        EXIT_TRANSPORT,
        "cannot resolve the host name: Name or service not known",
    )


def test_a_role_refusal_is_a_failure_not_a_connection_error() -> None:
    from theta._cli._common import EXIT_FAILURE, describe

    error = PermissionError("role <Role.UPLOAD_ASSETS: 2> may not send replication messages")
    assert describe(error) == (
        EXIT_FAILURE,
        "not permitted: role <Role.UPLOAD_ASSETS: 2> may not send replication messages",
    )
