"""The web processor against a real HTTP server on loopback.

Only 127.0.0.1 and ::1 are ever contacted: a fixture makes every other connect, and every
real DNS lookup of a name, fail the test.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from morag.core.errors import (
    ForbiddenTargetError,
    InvalidInputError,
    LimitExceededError,
    TransientError,
    UnsupportedFormatError,
)
from morag.core.url_guard import UrlPolicy, fetch
from morag.processors.base import ChunkingOptions, ProcessorLimits
from morag.processors.chunking import count_tokens
from morag.processors.web import process_web

LOOPBACK = UrlPolicy(allow=("127.0.0.1",))

ARTICLE = """<!doctype html><html lang="en"><head>
<title>The Pelican Guide | Birds Weekly</title>
<meta name="author" content="Jane Doe">
<meta property="og:site_name" content="Birds Weekly">
<meta name="date" content="2024-03-05">
</head><body>
<nav><a href="/">Home</a> | <a href="/about">About</a></nav>
<article>
<h1>The Pelican Guide</h1>
<p>Pelicans are large water birds with a distinctive pouch under the beak. They live on
every continent except Antarctica, mostly near warm water.</p>
<h2>Feeding</h2>
<p>Pelicans feed mainly on fish, which they catch by scooping them up in their pouch and
draining the water before swallowing. {feeding}</p>
<h3>Group fishing</h3>
<p>Several species herd fish together, cooperating to drive shoals into shallow water
where they are easier to catch.</p>
<h2>Habitat</h2>
<p>They prefer lakes, rivers and coasts. Some species breed in large colonies on islands,
far from predators.</p>
<table><tr><th>Species</th><th>Wingspan</th></tr><tr><td>Dalmatian</td><td>3.5 m</td></tr></table>
</article>
<footer>Copyright 2024 Birds Weekly</footer>
</body></html>
""".replace("{feeding}", "A pelican can hold up to eleven litres of water in its pouch. " * 40)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, family=socket.AF_INET):
        self.address_family = family
        super().__init__(address, Handler)
        self.connections = 0
        self.paths: list[str] = []
        self.big_sent = 0
        self.big_done = threading.Event()
        self.stop = threading.Event()
        self.tls_names: list[str | None] = []

    def verify_request(self, request, client_address):  # once per accepted connection
        self.connections += 1
        return True

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"


class Handler(BaseHTTPRequestHandler):
    server: Server

    def log_message(self, *args):  # keep pytest output clean
        pass

    def send(self, status: int, body: bytes = b"", content_type: str = "text/html", **headers):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.server.paths.append(self.path)
        route = ROUTES.get(self.path.split("?")[0])
        if route is None:
            self.send(404, b"<h1>not found</h1>")
        else:
            route(self)


def _redirect(target: Callable[[Handler], str]) -> Callable[[Handler], None]:
    return lambda h: h.send(302, b"", Location=target(h))


def _big(h: Handler) -> None:
    """Stream 64 MiB with no Content-Length, counting what the client let through."""
    h.send_response(200)
    h.send_header("Content-Type", "text/html")
    h.end_headers()
    block = b"<p>" + b"x" * 65_530 + b"</p>"
    try:
        for _ in range(1024):
            h.wfile.write(block)
            h.server.big_sent += len(block)
    except OSError:
        pass  # the client hung up, as it should
    finally:
        h.server.big_done.set()


def _drip(h: Handler, stall_after: float = 60.0) -> None:
    """A byte every 50 ms; after ``stall_after`` s, silence. Hangs up after 5 s in any case,
    so a client without an overall deadline fails fast instead of hanging the suite."""
    h.send_response(200)
    h.send_header("Content-Type", "text/html")
    h.send_header("Content-Length", "100000")
    h.end_headers()
    started = time.monotonic()
    try:
        while not h.server.stop.wait(0.05) and time.monotonic() - started < 5:
            if time.monotonic() - started < stall_after:
                h.wfile.write(b"x")
                h.wfile.flush()
    except OSError:
        pass


ROUTES: dict[str, Callable[[Handler], None]] = {
    "/article": lambda h: h.send(200, ARTICLE.encode(), "text/html; charset=utf-8"),
    "/notes.md": lambda h: h.send(
        200, b"# Field notes\n\nSeen three pelicans.\n\n## Weather\n\nSunny.", "text/markdown"
    ),
    "/plain": lambda h: h.send(
        200, "Plain pelican facts, caf\xe9.".encode(), "text/plain; charset=utf-8"
    ),
    "/empty": lambda h: h.send(
        200,
        b'<html><head><title>App</title></head><body><div id="root"></div>'
        b"<script>render()</script></body></html>",
    ),
    "/image": lambda h: h.send(200, b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "image/png"),
    "/error": lambda h: h.send(500, b"<h1>boom</h1>"),
    "/big": _big,
    "/big-declared": lambda h: h.send(200, b"x" * 300_000),
    "/drip": _drip,
    "/drip-then-stall": lambda h: _drip(h, stall_after=1.5),
    "/r1": _redirect(lambda h: "/r2"),
    "/r2": _redirect(lambda h: "/r3?x=1"),
    "/r3": _redirect(lambda h: f"http://127.0.0.1:{h.server.port}/article"),
    "/loop": _redirect(lambda h: "/loop"),
    "/to-v6": _redirect(lambda h: f"http://[::1]:{h.server.v6_port}/article"),
    "/to-name": _redirect(lambda h: f"http://inside.test:{h.server.port}/article"),
    "/to-metadata": _redirect(lambda h: "http://169.254.169.254/latest/meta-data/"),
}


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Fail any connect to a non-loopback address and any real lookup of a name."""
    real_connect, real_lookup = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if not ipaddress.ip_address(host).is_loopback:
            raise AssertionError(f"test tried to connect to {address!r}")
        return real_connect(self, address)

    def lookup(host, *args, **kwargs):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise AssertionError(f"test tried a real DNS lookup of {host!r}") from None
        return real_lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", lookup)


def _serve(server: Server):
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    return thread


@pytest.fixture
def v6_server():
    try:
        server = Server(("::1", 0), socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    _serve(server)
    yield server
    server.stop.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(request):
    server = Server(("127.0.0.1", 0))
    server.v6_port = 9  # replaced by tests that start the IPv6 listener
    _serve(server)
    yield server
    server.stop.set()
    server.shutdown()
    server.server_close()


def fake_resolver(table: dict[str, str]):
    def resolve(host, port, *args):
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (table[host], port))]

    return resolve


# --- pages --------------------------------------------------------------------------------


def test_article_becomes_markdown_with_metadata_and_chunks(server):
    stages = []
    result = process_web(
        server.url("/article"),
        policy=LOOPBACK,
        options=ChunkingOptions(chunk_tokens=128, overlap_tokens=16),
        progress=lambda fraction, stage, message="": stages.append((fraction, stage)),
    )
    assert result.kind == "web"
    md = result.markdown
    assert md.startswith("# The Pelican Guide")
    assert "## Feeding" in md and "### Group fishing" in md and "## Habitat" in md
    assert "| Dalmatian | 3.5 m |" in md
    assert "Home" not in md and "Copyright" not in md  # boilerplate dropped
    assert not md.startswith("---")  # no YAML front matter: metadata is kept apart

    meta = result.metadata
    assert meta["title"] == "The Pelican Guide"
    assert meta["author"] == "Jane Doe"
    assert meta["sitename"] == "Birds Weekly"
    assert meta["date"] == "2024-03-05"
    assert meta["final_url"] == meta["requested_url"] == server.url("/article")
    assert meta["content_type"] == "text/html"
    assert meta["fetched_bytes"] == len(ARTICLE.encode())

    assert len(result.chunks) > 3
    assert all(c.metadata["url"] == server.url("/article") for c in result.chunks)
    assert all(c.metadata["source"] == server.url("/article") for c in result.chunks)
    assert all(c.tokens <= 128 and c.tokens == count_tokens(c.text) for c in result.chunks)
    paths = [c.metadata.get("heading_path") for c in result.chunks]
    assert ["The Pelican Guide", "Feeding", "Group fishing"] in paths
    assert ["The Pelican Guide", "Habitat"] in paths

    assert [s for _, s in stages] == ["fetching", "extracting", "chunking", "finalising"]
    fractions = [f for f, _ in stages]
    assert fractions == sorted(fractions) and fractions[-1] < 1


def test_markdown_and_plain_text_are_taken_as_they_are(server):
    notes = process_web(server.url("/notes.md"), policy=LOOPBACK)
    assert notes.markdown.startswith("# Field notes")
    assert notes.metadata["title"] == "Field notes"
    assert notes.chunks[-1].metadata["heading_path"] == ["Field notes", "Weather"]

    plain = process_web(server.url("/plain"), policy=LOOPBACK)
    assert plain.markdown == "Plain pelican facts, café."
    assert plain.metadata["content_type"] == "text/plain"


def test_page_without_readable_content_is_invalid(server):
    with pytest.raises(InvalidInputError, match="no readable content found at http://127.0.0.1"):
        process_web(server.url("/empty"), policy=LOOPBACK)


def test_redirect_chain_is_followed(server):
    result = process_web(server.url("/r1"), policy=LOOPBACK)
    assert result.metadata["requested_url"] == server.url("/r1")
    assert result.metadata["final_url"] == server.url("/article")
    assert result.chunks[0].metadata["url"] == server.url("/article")
    assert server.paths == ["/r1", "/r2", "/r3?x=1", "/article"]


def test_redirect_chain_longer_than_the_limit_is_refused(server):
    with pytest.raises(InvalidInputError, match="too many redirects"):
        process_web(server.url("/r1"), policy=LOOPBACK, limits=ProcessorLimits(web_max_redirects=2))


def test_redirect_loop_ends_with_too_many_redirects(server):
    with pytest.raises(InvalidInputError, match="too many redirects"):
        process_web(server.url("/loop"), policy=LOOPBACK)
    assert server.paths == ["/loop"] * (ProcessorLimits().web_max_redirects + 1)


# --- the guard ----------------------------------------------------------------------------


def test_default_policy_refuses_loopback_and_sends_nothing(server):
    with pytest.raises(ForbiddenTargetError, match="127.0.0.1"):
        process_web(server.url("/article"), policy=UrlPolicy())
    assert server.connections == 0


def test_redirect_to_a_disallowed_loopback_address_is_refused(server, v6_server):
    server.v6_port = v6_server.port  # a real listener on [::1]: it must hear nothing
    with pytest.raises(ForbiddenTargetError, match="::1"):
        process_web(server.url("/to-v6"), policy=LOOPBACK)
    assert server.paths == ["/to-v6"]
    assert v6_server.connections == 0


def test_redirect_to_a_name_resolving_to_a_private_address_is_refused(server):
    resolver = fake_resolver({"inside.test": "10.1.2.3"})
    with pytest.raises(ForbiddenTargetError, match=r"inside\.test \(10\.1\.2\.3\)"):
        process_web(server.url("/to-name"), policy=LOOPBACK, resolver=resolver)
    assert server.connections == 1


def test_allowed_name_connects_to_the_address_it_resolved_to(server):
    resolver = fake_resolver({"inside.test": "127.0.0.1"})
    result = process_web(server.url("/to-name"), policy=LOOPBACK, resolver=resolver)
    assert result.metadata["final_url"] == f"http://inside.test:{server.port}/article"


def test_redirect_to_cloud_metadata_is_refused(server):
    with pytest.raises(ForbiddenTargetError, match="cloud metadata"):
        process_web(server.url("/to-metadata"), policy=LOOPBACK)


# --- limits and failures ------------------------------------------------------------------


def test_response_over_max_bytes_stops_early(server):
    limits = ProcessorLimits(web_max_bytes=256 * 1024)
    started = time.monotonic()
    with pytest.raises(LimitExceededError, match=str(256 * 1024)):
        process_web(server.url("/big"), policy=LOOPBACK, limits=limits)
    assert server.big_done.wait(10), "server kept streaming after the client gave up"
    assert server.big_sent < 32 * 1024 * 1024  # far less than the 64 MiB on offer
    assert time.monotonic() - started < 10


def test_declared_length_over_max_bytes_is_refused(server):
    with pytest.raises(LimitExceededError, match="300000 bytes"):
        process_web(
            server.url("/big-declared"),
            policy=LOOPBACK,
            limits=ProcessorLimits(web_max_bytes=100_000),
        )


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("path", "timeout"), [("/drip", 1.0), ("/drip-then-stall", 2.0)])
def test_a_page_that_never_finishes_ends_at_the_deadline(server, path, timeout):
    # per-read timeouts alone would let the drip go on, and the stall end at 1.5 s + 2 s
    started = time.monotonic()
    with pytest.raises(TransientError, match="timed out"):
        process_web(
            server.url(path), policy=LOOPBACK, limits=ProcessorLimits(web_timeout_seconds=timeout)
        )
    elapsed = time.monotonic() - started
    assert timeout - 0.1 < elapsed < timeout + 0.8, elapsed


def test_non_html_content_type_is_refused(server):
    with pytest.raises(UnsupportedFormatError, match="image/png"):
        process_web(server.url("/image"), policy=LOOPBACK)


def test_server_error_is_transient(server):
    with pytest.raises(TransientError) as caught:
        process_web(server.url("/error"), policy=LOOPBACK)
    assert caught.value.retryable and caught.value.details["status"] == 500


def test_not_found_is_invalid_input(server):
    with pytest.raises(InvalidInputError) as caught:
        process_web(server.url("/nowhere"), policy=LOOPBACK)
    assert caught.value.details["status"] == 404 and not caught.value.retryable


def test_nothing_listening_is_transient(server):
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(TransientError, match="cannot connect"):
        process_web(f"http://127.0.0.1:{port}/", policy=LOOPBACK)


# --- TLS: the pinned address still gets SNI and certificate checks for the name -------------


def _make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=morag test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    )
    run("req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=pelican.test")
    (directory / "leaf.ext").write_text(
        "subjectAltName=DNS:pelican.test\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    run(
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
    )
    return directory / "ca.pem", directory / "leaf.pem", directory / "leaf.key"


@pytest.fixture
def tls_server(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not available to make a test certificate")
    ca, cert, key = _make_certificates(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = Server(("127.0.0.1", 0))

    def remember_sni(sock, name, ctx):
        server.tls_names.append(name)

    context.sni_callback = remember_sni
    server.socket = context.wrap_socket(server.socket, server_side=True)
    _serve(server)
    yield server, ssl.create_default_context(cafile=str(ca))
    server.stop.set()
    server.shutdown()
    server.server_close()


def test_https_to_a_pinned_address_verifies_the_host_name(tls_server):
    server, client_context = tls_server
    resolver = fake_resolver({"pelican.test": "127.0.0.1", "other.test": "127.0.0.1"})
    result = fetch(
        f"https://pelican.test:{server.port}/article",
        LOOPBACK,
        timeout=5,
        resolver=resolver,
        verify=client_context,
    )
    assert result.status == 200 and b"Pelican" in result.content
    assert server.tls_names == ["pelican.test"]

    with pytest.raises(InvalidInputError, match="certificate"):  # name not in the certificate
        fetch(
            f"https://other.test:{server.port}/article",
            LOOPBACK,
            timeout=5,
            resolver=resolver,
            verify=client_context,
        )
    assert server.tls_names[-1] == "other.test"
