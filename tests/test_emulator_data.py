"""The emulator's data endpoints, called directly with requests and http.client over real TLS."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from keyagent.testing.emulator import (
    REDIRECT_LOCATION,
    SESSION_COOKIE,
    ConduceEmulator,
    Fault,
    blob_chunks,
    blob_sha256,
    key_id,
)
from keyagent.testing.emulator_process import EmulatorProcess

USER = "erin@example.com"
PASSWORD = "data password 7a2c"
OTHER_USER = "frank@example.com"
OTHER_PASSWORD = "frank's password 31bd"
MIB = 1 << 20
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")

# One request per data endpoint, with a method it accepts: each must refuse anonymous calls.
ENDPOINTS = [
    ("GET", "/conduce/api/v1/user/list-teams"),
    ("GET", "/conduce/api/v1/datasets/metadata/0000"),
    ("POST", "/conduce/api/v1/datasets/create"),
    ("PATCH", "/conduce/api/v1/echo/x"),
    ("DELETE", "/conduce/api/v2/resources/abc"),
    ("PUT", "/api/v2/data/transactions/t1"),
    ("GET", "/api/v2/data/blob/10"),
    ("POST", "/api/v2/data/upload"),
    ("GET", "/api/v2/data/redirect"),
]


@pytest.fixture(autouse=True)
def hermetic_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the caller's proxies, CA bundle and netrc out of loopback traffic."""
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "REQUESTS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


@pytest.fixture
def emulator() -> Iterator[ConduceEmulator]:
    with ConduceEmulator() as emu:
        emu.add_user(USER, PASSWORD)
        emu.add_user(OTHER_USER, OTHER_PASSWORD)
        yield emu


@pytest.fixture
def key(emulator: ConduceEmulator) -> str:
    return emulator.add_key(USER)


@pytest.fixture
def session(emulator: ConduceEmulator) -> Iterator[requests.Session]:
    """A requests session trusting the emulator's CA and nothing from the environment."""
    with requests.Session() as http_session:
        http_session.verify = emulator.ca_path
        http_session.trust_env = False
        yield http_session


@pytest.fixture
def authed(session: requests.Session, key: str) -> requests.Session:
    """The session, sending USER's API key."""
    session.headers["Authorization"] = f"Bearer {key}"
    return session


def connection(emulator: ConduceEmulator | EmulatorProcess) -> http.client.HTTPSConnection:
    context = ssl.create_default_context(cafile=emulator.ca_path)
    return http.client.HTTPSConnection("127.0.0.1", emulator.port, context=context, timeout=30)


# --- authentication and the request log ---------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_every_data_endpoint_needs_credentials(
    session: requests.Session, emulator: ConduceEmulator, method: str, path: str
) -> None:
    """Each data endpoint answers 401 without credentials, with a wrong key or a dead cookie."""
    assert session.request(method, emulator.url + path).status_code == 401
    wrong = {"Authorization": "Bearer 00000000-0000-4000-8000-000000000000"}
    assert session.request(method, emulator.url + path, headers=wrong).status_code == 401
    cookie = {"Cookie": f"{SESSION_COOKIE}=not-a-session"}
    assert session.request(method, emulator.url + path, headers=cookie).status_code == 401


def test_session_cookie_authenticates_data_calls(
    session: requests.Session, emulator: ConduceEmulator
) -> None:
    """A session cookie from user/login authenticates data endpoints, like the key calls."""
    login = session.post(
        emulator.url + "/conduce/api/v1/user/login", json={"email": USER, "password": PASSWORD}
    )
    assert login.status_code == 200
    teams = session.get(emulator.url + "/conduce/api/v1/user/list-teams")
    assert teams.status_code == 200
    assert [team["name"] for team in teams.json()] == [USER]
    assert emulator.requests[-1].auth == "cookie"
    assert emulator.requests[-1].user == USER


def test_requests_are_logged_with_method_path_and_status(
    authed: requests.Session, emulator: ConduceEmulator
) -> None:
    """Data calls show in the request log with method, path (one leading slash) and status."""
    authed.get(emulator.url + "/conduce/api/v1/user/list-teams")
    authed.delete(emulator.url + "//api/v2/data/things/1")
    authed.head(emulator.url + "/api/v2/data/blob/5")
    authed.put(emulator.url + "/conduce/api/v1/user/list-teams")
    logged = [(r.method, r.path, r.status, r.auth, r.user) for r in emulator.requests]
    assert logged == [
        ("GET", "user/list-teams", 200, "bearer", USER),
        ("DELETE", "/api/v2/data/things/1", 200, "bearer", USER),
        ("HEAD", "/api/v2/data/blob/5", 200, "bearer", USER),
        ("PUT", "user/list-teams", 405, "bearer", None),
    ]


def test_faults_apply_to_data_paths(authed: requests.Session, emulator: ConduceEmulator) -> None:
    """A fault injected for a full /api/ path hits that path only, however many slashes lead."""
    emulator.inject(Fault.status(503), path="/api/v2/data/blob/10", count=1)
    assert authed.get(emulator.url + "/api/v2/data/blob/11").status_code == 200
    assert authed.get(emulator.url + "//api/v2/data/blob/10").status_code == 503
    assert authed.get(emulator.url + "/api/v2/data/blob/10").status_code == 200
    with pytest.raises(ValueError, match="full paths under /api/"):
        emulator.inject(Fault.status(503), path="/elsewhere/blob")


# --- teams and datasets -------------------------------------------------------------------------


def test_list_teams_answers_a_json_list(
    authed: requests.Session, emulator: ConduceEmulator
) -> None:
    """list-teams answers a JSON list with one team per account; other methods 405."""
    answer = authed.get(emulator.url + "/conduce/api/v1/user/list-teams")
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "application/json"
    (team,) = answer.json()
    assert team["name"] == USER
    assert team["role"] == "owner"
    assert answer.json() == authed.get(emulator.url + "/conduce/api/v1/user/list-teams").json()
    refused = authed.post(emulator.url + "/conduce/api/v1/user/list-teams")
    assert refused.status_code == 405
    assert refused.headers["Allow"] == "GET, HEAD"


def test_head_answers_the_head_of_get(authed: requests.Session, emulator: ConduceEmulator) -> None:
    """HEAD gets the status and headers GET would get, and no body."""
    url = emulator.url + "/conduce/api/v1/user/list-teams"
    got, head = authed.get(url), authed.head(url)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["Content-Length"] == str(len(got.content))


def test_created_dataset_has_metadata(
    authed: requests.Session, session: requests.Session, emulator: ConduceEmulator
) -> None:
    """datasets/create makes a dataset whose metadata only its owner can read; others get 404."""
    created = authed.post(emulator.url + "/conduce/api/v1/datasets/create", json={"name": "rain"})
    assert created.status_code == 200
    dataset = created.json()["id"]
    metadata = authed.get(emulator.url + f"/conduce/api/v1/datasets/metadata/{dataset}")
    assert metadata.status_code == 200
    assert metadata.json()["id"] == dataset
    assert metadata.json()["name"] == "rain"
    assert metadata.json()["owner"] == USER
    other = {"Authorization": f"Bearer {emulator.add_key(OTHER_USER)}"}
    url = emulator.url + f"/conduce/api/v1/datasets/metadata/{dataset}"
    assert session.get(url, headers=other).status_code == 404
    unknown = authed.get(emulator.url + "/conduce/api/v1/datasets/metadata/no-such-dataset")
    assert unknown.status_code == 404


def test_add_dataset_from_the_test(authed: requests.Session, emulator: ConduceEmulator) -> None:
    """add_dataset creates a dataset without the API; an unknown account is a KeyError."""
    dataset = emulator.add_dataset(USER, "seeded")
    metadata = authed.get(emulator.url + f"/conduce/api/v1/datasets/metadata/{dataset}")
    assert metadata.json()["name"] == "seeded"
    with pytest.raises(KeyError):
        emulator.add_dataset("nobody@example.com")


@pytest.mark.parametrize("body", [b"[1]", b"{not json", b'{"name": 5}'])
def test_create_refuses_a_bad_body(
    authed: requests.Session, emulator: ConduceEmulator, body: bytes
) -> None:
    """datasets/create answers 400 to a body that is not an object with a string name."""
    answer = authed.post(emulator.url + "/conduce/api/v1/datasets/create", data=body)
    assert answer.status_code == 400


def test_create_refuses_an_oversized_body(
    authed: requests.Session, emulator: ConduceEmulator
) -> None:
    """datasets/create answers 413 to a body over 64 KiB and does not buffer it."""
    body = json.dumps({"name": "x" * (128 * 1024)})
    answer = authed.post(emulator.url + "/conduce/api/v1/datasets/create", data=body)
    assert answer.status_code == 413


# --- echo ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_echo_shows_the_request(
    authed: requests.Session, emulator: ConduceEmulator, key: str, method: str
) -> None:
    """Echo answers every method with method, path, raw query, headers and body digest."""
    body = b"some body \x00\xff" * 100 if method != "HEAD" else b""
    answer = authed.request(
        method,
        emulator.url + "/api/v2/data/echo/a%20b?q=1&q=2&empty=",
        data=body,
        headers={"X-Custom-Thing": "v1"},
    )
    assert answer.status_code == 200
    assert answer.headers["X-Echo"] == "1"
    assert answer.headers["Set-Cookie"].startswith("tracking=1")
    if method == "HEAD":
        assert answer.content == b""
        return
    echoed = answer.json()
    assert echoed["method"] == method
    assert echoed["path"] == "/api/v2/data/echo/a%20b"
    assert echoed["query"] == "q=1&q=2&empty="
    assert echoed["headers"]["x-custom-thing"] == "v1"
    assert echoed["headers"]["authorization"] == {
        "auth": "bearer",
        "key_id": key_id(key),
        "valid": True,
    }
    assert echoed["body_length"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert key not in answer.text


@pytest.mark.parametrize(
    "path",
    [
        "/conduce/api/v1/echo",
        "/conduce/api/v2/resources",
        "/conduce/api/v2/resources/visualizations/v1",
        "/api/v2/data/transactions",
        "//api/v2/data/transactions",
    ],
)
def test_echo_answers_under_every_prefix(
    authed: requests.Session, emulator: ConduceEmulator, path: str
) -> None:
    """The v1 echo, v2 resources and v2 data prefixes echo, a doubled leading slash as sent."""
    answer = authed.post(emulator.url + path, json={"x": 1})
    assert answer.status_code == 200
    assert answer.json()["path"] == path


def test_echo_never_shows_a_session_cookie(
    session: requests.Session, emulator: ConduceEmulator
) -> None:
    """Echo replaces the Cookie header by the cookie names and whether the session is live."""
    session.post(
        emulator.url + "/conduce/api/v1/user/login", json={"email": USER, "password": PASSWORD}
    )
    (token,) = emulator.session_tokens(USER)
    session.cookies.set("other", "visible-name-only", domain="127.0.0.1")
    answer = session.get(emulator.url + "/conduce/api/v1/echo")
    assert answer.json()["headers"]["cookie"] == {
        "auth": "cookie",
        "names": sorted([SESSION_COOKIE, "other"]),
        "session": True,
    }
    assert token not in answer.text
    assert "visible-name-only" not in answer.text


def test_other_authorization_scheme_is_refused_even_with_a_session(
    session: requests.Session, emulator: ConduceEmulator
) -> None:
    """A non-bearer Authorization header makes a data call 401, live cookie or not, unechoed."""
    session.post(
        emulator.url + "/conduce/api/v1/user/login", json={"email": USER, "password": PASSWORD}
    )
    answer = session.get(
        emulator.url + "/conduce/api/v1/echo", headers={"Authorization": "Basic eA=="}
    )
    assert answer.status_code == 401
    assert "eA==" not in answer.text


# --- streaming ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
def test_blob_streams_deterministic_content(
    authed: requests.Session, emulator: ConduceEmulator, chunked: bool
) -> None:
    """blob/<N> streams N bytes of blob_chunks content, with Content-Length or chunked."""
    size = 3 * MIB + 12345
    query = "?chunked=1" if chunked else ""
    with authed.get(emulator.url + f"/api/v2/data/blob/{size}{query}", stream=True) as answer:
        assert answer.status_code == 200
        assert answer.headers["Content-Type"] == "application/octet-stream"
        if chunked:
            assert answer.headers["Transfer-Encoding"] == "chunked"
            assert "Content-Length" not in answer.headers
        else:
            assert answer.headers["Content-Length"] == str(size)
        content = answer.content
    assert len(content) == size
    assert content == b"".join(blob_chunks(size))
    assert hashlib.sha256(content).hexdigest() == blob_sha256(size)
    assert len(set(content[:4096])) > 200  # not a run of one byte: misplaced pieces would show


def test_blob_edge_sizes_and_bad_sizes(authed: requests.Session, emulator: ConduceEmulator) -> None:
    """blob/0 is empty, a non-number or an over-large size is 404, POST is 405."""
    assert authed.get(emulator.url + "/api/v2/data/blob/0").content == b""
    assert authed.get(emulator.url + "/api/v2/data/blob/0?chunked=1").content == b""
    assert authed.get(emulator.url + "/api/v2/data/blob/ten").status_code == 404
    assert authed.get(emulator.url + "/api/v2/data/blob/-1").status_code == 404
    assert authed.get(emulator.url + f"/api/v2/data/blob/{(1 << 40) + 1}").status_code == 404
    assert authed.post(emulator.url + "/api/v2/data/blob/10").status_code == 405


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_upload_digests_content_length_and_chunked_bodies(
    authed: requests.Session, emulator: ConduceEmulator, method: str
) -> None:
    """upload reads a Content-Length or chunked body and answers its length and SHA-256."""
    body = b"".join(blob_chunks(2 * MIB + 7))
    expected = {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    whole = authed.request(method, emulator.url + "/api/v2/data/upload", data=body)
    assert whole.json() == expected

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(body), 300_001):
            yield body[start : start + 300_001]

    chunked = authed.request(method, emulator.url + "/api/v2/data/upload", data=pieces())
    assert chunked.request.headers["Transfer-Encoding"] == "chunked"
    assert chunked.json() == expected
    assert authed.get(emulator.url + "/api/v2/data/upload").status_code == 405


def test_chunked_body_with_extensions_and_trailers(emulator: ConduceEmulator, key: str) -> None:
    """Chunk extensions and trailer fields are understood and skipped."""
    conn = connection(emulator)
    conn.putrequest("POST", "/api/v2/data/upload")
    conn.putheader("Authorization", f"Bearer {key}")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"5;name=value\r\nhello\r\n1\r\n!\r\n0\r\nX-Trailer: 1\r\n\r\n")
    answer = conn.getresponse()
    assert json.loads(answer.read()) == {
        "length": 6,
        "sha256": hashlib.sha256(b"hello!").hexdigest(),
    }
    conn.close()


@pytest.mark.parametrize(
    ("headers", "raw"),
    [
        ({"Transfer-Encoding": "chunked"}, b"zz\r\nhello\r\n0\r\n\r\n"),
        ({"Transfer-Encoding": "chunked"}, b"5\r\nhelloXX0\r\n\r\n"),
        ({"Transfer-Encoding": "gzip"}, b""),
        ({"Content-Length": "-5"}, b""),
    ],
)
def test_broken_body_framing_is_400_and_close(
    emulator: ConduceEmulator, key: str, headers: dict[str, str], raw: bytes
) -> None:
    """A data call whose body framing is broken gets 400 and the connection is closed."""
    conn = connection(emulator)
    conn.putrequest("POST", "/api/v2/data/upload", skip_accept_encoding=True)
    conn.putheader("Authorization", f"Bearer {key}")
    for name, value in headers.items():
        conn.putheader(name, value)
    conn.endheaders()
    conn.send(raw)
    answer = conn.getresponse()
    answer.read()
    assert answer.status == 400
    assert answer.will_close
    assert emulator.requests[-1].status == 400
    conn.close()


def test_keep_alive_across_data_calls(emulator: ConduceEmulator, key: str) -> None:
    """One connection carries a download, a chunked download, an upload and an echo in turn."""
    conn = connection(emulator)
    auth = {"Authorization": f"Bearer {key}"}
    calls = [
        ("GET", "/api/v2/data/blob/70000", None),
        ("GET", "/api/v2/data/blob/70000?chunked=1", None),
        ("PUT", "/api/v2/data/upload", b"x" * 70000),
        ("HEAD", "/api/v2/data/blob/9", None),
        ("GET", "/conduce/api/v1/user/list-teams", None),
        ("DELETE", "/api/v2/data/echo", None),
    ]
    sockets = set()
    for method, path, body in calls:
        conn.request(method, path, body=body, headers=auth)
        answer = conn.getresponse()
        answer.read()
        assert answer.status == 200, (method, path)
        assert not answer.will_close
        sockets.add(id(conn.sock))
    assert len(sockets) == 1
    assert len(emulator.requests) == len(calls)
    conn.close()


def test_unauthenticated_upload_keeps_the_connection(emulator: ConduceEmulator) -> None:
    """A refused upload's body is read and dropped, so the connection serves the next call."""
    conn = connection(emulator)
    conn.request("POST", "/api/v2/data/upload", body=b"y" * 300_000)
    first = conn.getresponse()
    first.read()
    assert first.status == 401
    assert not first.will_close
    conn.request("GET", "/api/v2/data/blob/3")
    second = conn.getresponse()
    assert second.status == 401
    conn.close()


def test_redirect_is_an_absolute_302(authed: requests.Session, emulator: ConduceEmulator) -> None:
    """redirect answers 302 with an absolute Location on another host, for every method."""
    for method in METHODS:
        answer = authed.request(
            method, emulator.url + "/api/v2/data/redirect", allow_redirects=False
        )
        assert answer.status_code == 302
        assert answer.headers["Location"] == REDIRECT_LOCATION
    assert REDIRECT_LOCATION.startswith("https://")
    assert "127.0.0.1" not in REDIRECT_LOCATION


# --- the emulator as a process: memory and the control channel ----------------------------------


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def test_100_mib_each_way_keeps_the_emulator_small() -> None:
    """A 100 MiB download (both framings) and upload leave the emulator's peak RSS within 5 MiB."""
    size = 100 * MIB
    with EmulatorProcess(USER, PASSWORD) as emu:
        key = emu.add_key(USER)
        auth = {"Authorization": f"Bearer {key}"}
        conn = connection(emu)
        # Warm up: the blob block, a handler thread and TLS buffers exist before the baseline.
        for method, path, body in [
            ("GET", "/api/v2/data/blob/3000000", None),
            ("PUT", "/api/v2/data/upload", b"w" * 3_000_000),
        ]:
            conn.request(method, path, body=body, headers=auth)
            conn.getresponse().read()
        # Resets the peak (VmHWM) to the current RSS: the owner of a process may do this.
        Path(f"/proc/{emu.pid}/clear_refs").write_text("5")
        baseline = _rss_kib(emu.pid, "VmRSS")
        for query in ("", "?chunked=1"):
            conn.request("GET", f"/api/v2/data/blob/{size}{query}", headers=auth)
            answer = conn.getresponse()
            digest, received = hashlib.sha256(), 0
            while piece := answer.read(MIB):
                digest.update(piece)
                received += len(piece)
            assert received == size
            assert digest.hexdigest() == blob_sha256(size)
        conn.request(
            "PUT", "/api/v2/data/upload", body=blob_chunks(size), headers=auth, encode_chunked=True
        )
        assert json.loads(conn.getresponse().read()) == {
            "length": size,
            "sha256": blob_sha256(size),
        }
        peak = _rss_kib(emu.pid, "VmHWM")
        conn.close()
    assert peak - baseline < 5 * 1024, (baseline, peak)


def test_add_dataset_through_the_control_channel() -> None:
    """EmulatorProcess.add_dataset makes a dataset the API then shows; unknown account: KeyError."""
    with EmulatorProcess(USER, PASSWORD) as emu:
        dataset = emu.add_dataset(USER, "remote")
        key = emu.add_key(USER)
        conn = connection(emu)
        conn.request(
            "GET",
            f"/conduce/api/v1/datasets/metadata/{dataset}",
            headers={"Authorization": f"Bearer {key}"},
        )
        assert json.loads(conn.getresponse().read())["name"] == "remote"
        conn.close()
        with pytest.raises(KeyError):
            emu.add_dataset("nobody@example.com")


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_upload_with_expect_100_continue(
    emulator: ConduceEmulator, key: str, tmp_path: Path
) -> None:
    """curl's Expect: 100-continue upload of a file (PUT -T) gets 100 Continue at once (curl
    gives up waiting after a second and sends anyway), then its digest."""
    body = b"".join(blob_chunks(5 * MIB))
    (tmp_path / "upload").write_bytes(body)
    (tmp_path / "header").write_text(f"Authorization: Bearer {key}\n")
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "-v",
            "--fail",
            "--cacert",
            emulator.ca_path,
            "-H",
            f"@{tmp_path / 'header'}",
            "-H",
            "Expect: 100-continue",
            "-T",
            str(tmp_path / "upload"),
            emulator.url + "/api/v2/data/upload",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "< HTTP/1.1 100 Continue" in result.stderr
    assert "Done waiting for 100-continue" not in result.stderr  # it came at once, not late
    assert json.loads(result.stdout) == {"length": len(body), "sha256": blob_sha256(5 * MIB)}


def test_head_of_a_chunked_blob_has_no_body(emulator: ConduceEmulator, key: str) -> None:
    """HEAD of a chunked blob answers its head only, and the connection serves the next call."""
    conn = connection(emulator)
    auth = {"Authorization": f"Bearer {key}"}
    conn.request("HEAD", "/api/v2/data/blob/5000?chunked=1", headers=auth)
    head = conn.getresponse()
    assert head.read() == b""
    assert head.getheader("Transfer-Encoding") == "chunked"
    conn.request("GET", "/api/v2/data/blob/5", headers=auth)
    assert conn.getresponse().read() == b"".join(blob_chunks(5))
    conn.close()


def test_echo_lists_every_credential_header(emulator: ConduceEmulator, key: str) -> None:
    """Repeated Authorization and Cookie headers are each echoed, as lists, never their values."""
    other_key = emulator.add_key(USER)
    conn = connection(emulator)
    conn.putrequest("GET", "/conduce/api/v1/echo")
    conn.putheader("Authorization", f"Bearer {key}")
    conn.putheader("Authorization", "Basic c2VjcmV0")
    conn.putheader("Authorization", f"Bearer {other_key}")
    conn.putheader("Cookie", f"{SESSION_COOKIE}=stale-token")
    conn.putheader("Cookie", "theme=dark")
    conn.endheaders()
    text = conn.getresponse().read().decode()
    conn.close()
    echoed = json.loads(text)["headers"]
    assert echoed["authorization"] == [
        {"auth": "bearer", "key_id": key_id(key), "valid": True},
        {"auth": "other"},
        {"auth": "bearer", "key_id": key_id(other_key), "valid": True},
    ]
    assert echoed["cookie"] == [
        {"auth": "cookie", "names": [SESSION_COOKIE], "session": False},
        {"auth": "cookie", "names": ["theme"], "session": None},
    ]
    for secret in (key, other_key, "c2VjcmV0", "stale-token", "dark"):
        assert secret not in text


def test_a_small_answer_leaves_in_one_tls_record(emulator: ConduceEmulator, key: str) -> None:
    """As from a real front end: the head and a small body in one write, so a client's one
    read has it all. (Sent as two, every direct client in bench/ paid a second read, which
    made the HTTP socket's rows look better than a real service would.)"""
    context = ssl.create_default_context(cafile=emulator.ca_path)
    raw = socket.create_connection(("127.0.0.1", emulator.port), timeout=30)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(
            f"GET /conduce/api/v1/user/list-teams HTTP/1.1\r\nHost: {emulator.host}\r\n"
            f"Authorization: Bearer {key}\r\n\r\n".encode()
        )
        answer = tls.recv(1 << 16)  # one TLS record at most
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    length = re.search(rb"(?i)\r\ncontent-length: (\d+)", head)
    assert length is not None
    assert len(body) == int(length[1]) > 0
