"""Tests of the test stand-ins: the fn4 HTTP stand-in and the TCP proxy, over real sockets."""

import datetime
import os
import socket
import socketserver
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest
import requests

from conftest import free_port
from fn4_standin import FN4StandIn, Scripted, is_unsafe_guid
from tcp_proxy import TCPProxy

TIMEOUT = 10


@pytest.fixture
def fn4():
    with FN4StandIn() as server:
        yield server


@pytest.fixture
def session():
    with requests.Session() as s:
        s.trust_env = False   # never go through an environment proxy to reach 127.0.0.1
        yield s


def insert(session, server, guid=None, seq=None, **kwargs):
    data = {k: v for k, v in (("guid", guid), ("seq", seq)) if v is not None}
    kwargs.setdefault("timeout", TIMEOUT)
    kwargs.setdefault("data", data)
    return session.post(server.url + "/api/v2/insert", **kwargs)


def get(session, server, path, **kwargs):
    kwargs.setdefault("timeout", TIMEOUT)
    return session.get(server.url + path, **kwargs)


# ------------------------------------------------------------------ inserts

def test_insert_stores_upper_cased_sequence(fn4, session):
    r = insert(session, fn4, "g1", "acgtn-rykmswbdhv")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    assert int(r.headers["Content-Length"]) == len(r.content)
    assert r.json() == "Guid g1 inserted."
    assert fn4.guids == {"g1": "ACGTN-RYKMSWBDHV"}


def test_repeat_answers_201_whatever_the_sequence(fn4, session):
    assert insert(session, fn4, "g1", "ACGT").status_code == 200
    r = insert(session, fn4, "g1", "not a sequence!")
    assert r.status_code == 201
    assert r.json() == "Guid g1 is already present"
    assert fn4.guids["g1"] == "ACGT"


def test_prefilled_guid_is_present(fn4, session):
    fn4.guids["pre"] = "ACGT"
    assert get(session, fn4, "/api/v2/pre/exists").json() is True
    assert insert(session, fn4, "pre", "ACGT").status_code == 201


def test_guid_of_60_characters_is_forbidden(fn4, session):
    assert insert(session, fn4, "a" * 59, "ACGT").status_code == 200
    r = insert(session, fn4, "b" * 60, "ACGT")
    assert r.status_code == 403
    assert "<title>403 Forbidden</title>" in r.text
    assert "b" * 60 not in fn4.guids


@pytest.mark.parametrize("guid", ["a b", "a/b", "a?b", "a#b", "a\tb", "caf\u00e9", ""])
def test_unsafe_guid_is_half_stored_with_503_then_201(fn4, session, guid):
    assert is_unsafe_guid(guid)
    r = insert(session, fn4, guid, "ACGT")
    assert r.status_code == 503
    assert fn4.guids == {guid: None}
    assert guid in get(session, fn4, "/api/v2/guids").json()
    assert insert(session, fn4, guid, "ACGT").status_code == 201


def test_guid_with_space_exists_when_percent_encoded(fn4, session):
    insert(session, fn4, "a b", "ACGT")
    assert get(session, fn4, "/api/v2/" + quote("a b") + "/exists").json() is True


@pytest.mark.parametrize("seq", ["ACGU", "ACGT\n", "ACGT\r\n", "ACGT ", "AC GT", "ACGX", "ACG?", "ACG*", ""])
def test_invalid_sequence_answers_500_html_and_stores_nothing(fn4, session, seq):
    r = insert(session, fn4, "g1", seq)
    assert r.status_code == 500
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    assert r.text.startswith("<!doctype html>")
    assert "<title>500 Internal Server Error</title>" in r.text
    assert fn4.guids == {}
    assert insert(session, fn4, "g1", "ACGT").status_code == 200


def test_invalid_sequence_with_unsafe_guid_stores_nothing(fn4, session):
    assert insert(session, fn4, "a b", "ACGU").status_code == 500
    assert fn4.guids == {}


def test_sequence_of_wrong_length_answers_500():
    with FN4StandIn(reference_length=5) as fn4, requests.Session() as s:
        r = insert(s, fn4, "g1", "ACGT")
        assert r.status_code == 500
        assert "sequence must of the same length as reference; seq is 4 and ref is 5" in r.text
        assert insert(s, fn4, "g1", "ACGTAA").status_code == 500
        assert fn4.guids == {}
        assert insert(s, fn4, "g1", "acgtn").status_code == 200


@pytest.mark.parametrize("kwargs", [
    {"data": {"seq": "ACGT"}},
    {"data": {"guid": "g1"}},
    {"data": {}},
    {"json": {"guid": "g1", "seq": "ACGT"}},
    {"data": {"guid": "g1"}, "files": {"seq": ("g1.fasta", b"ACGT")}},
], ids=["no-guid", "no-seq", "empty", "json-body", "seq-as-file"])
def test_missing_form_field_answers_501(fn4, session, kwargs):
    r = insert(session, fn4, **kwargs)
    assert r.status_code == 501
    assert "<title>501 Not Implemented</title>" in r.text
    assert fn4.guids == {}
    assert fn4.inserts[-1].status == 501


def test_multipart_text_fields_are_form_fields(fn4, session):
    r = insert(session, fn4, files={"guid": (None, "g1"), "seq": (None, "ACGT")}, data=None)
    assert r.status_code == 200
    assert fn4.guids == {"g1": "ACGT"}


def test_inserts_are_recorded(fn4, session):
    insert(session, fn4, "g1", "ACGT")
    insert(session, fn4, "g1", "ACGT")
    insert(session, fn4, "g2", "ACGU")
    assert [(i.guid, i.seq_len, i.status) for i in fn4.inserts] == [
        ("g1", 4, 200), ("g1", 4, 201), ("g2", 4, 500)]
    assert all(i.started <= i.ended for i in fn4.inserts)
    assert not any(i.scripted for i in fn4.inserts)


def test_insert_delay_is_spent_server_side_and_inserts_are_serialised(fn4):
    fn4.insert_delay = 0.05

    def one(i):
        with requests.Session() as s:
            return insert(s, fn4, "g{0}".format(i), "ACGT").status_code

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(one, range(8))) == [200] * 8
    records = sorted(fn4.inserts, key=lambda r: r.started)
    assert len(records) == 8
    assert all(r.ended - r.started >= 0.05 for r in records)
    assert all(b.started >= a.ended for a, b in zip(records, records[1:]))   # the insert lock


# ------------------------------------------------------------------ other routes

def test_guids_and_exists(fn4, session):
    assert get(session, fn4, "/api/v2/guids").json() == []
    for g in ("g1", "g2", "x:y%z"):
        assert insert(session, fn4, g, "ACGT").status_code == 200
    r = get(session, fn4, "/api/v2/guids")
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    assert sorted(r.json()) == ["g1", "g2", "x:y%z"]
    assert get(session, fn4, "/api/v2/g1/exists").json() is True
    assert get(session, fn4, "/api/v2/nope/exists").json() is False
    assert get(session, fn4, "/api/v2/" + quote("x:y%z", safe="") + "/exists").json() is True


def test_server_time_and_name(fn4, session):
    body = get(session, fn4, "/api/v2/server_time").json()
    assert body["server_name"] == "standin"
    t = datetime.datetime.fromisoformat(body["server_time"])
    assert t.tzinfo is None
    assert abs((datetime.datetime.now() - t).total_seconds()) < 60
    assert get(session, fn4, "/api/v2/server_name").json()["server_name"] == "standin"


def test_unknown_route_is_404_json_and_wrong_method_405(fn4, session):
    r = get(session, fn4, "/api/v2/nothing_here")
    assert r.status_code == 404
    assert r.json() == {"error": "Not found (custom error handler for mis-routing)"}
    assert get(session, fn4, "/api/v2/a/b/exists").status_code == 404
    assert get(session, fn4, "/api/v2/insert").status_code == 405
    assert session.post(fn4.url + "/api/v2/guids", timeout=TIMEOUT).status_code == 405


def test_requests_records_and_bytes_sent(fn4, session):
    insert(session, fn4, "g1", "ACGT")
    r1 = get(session, fn4, "/api/v2/guids")
    r2 = get(session, fn4, "/api/v2/guids?x=1")
    r3 = get(session, fn4, "/api/v2/g1/exists")
    assert [(q.method, q.path, q.status) for q in fn4.requests] == [
        ("POST", "/api/v2/insert", 200), ("GET", "/api/v2/guids", 200),
        ("GET", "/api/v2/guids?x=1", 200), ("GET", "/api/v2/g1/exists", 200)]
    assert fn4.requests[1].response_bytes == len(r1.content)
    assert fn4.bytes_sent("/api/v2/guids") == len(r1.content) + len(r2.content)
    assert fn4.bytes_sent("/api/v2/g1") == len(r3.content)
    assert fn4.bytes_sent() == sum(q.response_bytes for q in fn4.requests)


def test_keep_alive_and_tcp_nodelay(fn4, session):
    times = []
    for i in range(20):
        t0 = time.perf_counter()
        assert insert(session, fn4, "g{0}".format(i), "ACGT").status_code == 200
        times.append(time.perf_counter() - t0)
    socks = list(fn4._server.open_sockets)
    assert len(socks) == 1   # one keep-alive connection served all 20 inserts
    assert socks[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    # Nagle + delayed ACK would make this about 40 ms
    assert statistics.median(times) < 0.02


# ------------------------------------------------------------------ scripted answers

def test_scripted_status_is_consumed_in_order(fn4, session):
    fn4.script(Scripted(status=503), Scripted(status=409))
    assert insert(session, fn4, "g1", "ACGT").status_code == 503
    r = insert(session, fn4, "g1", "ACGT")
    assert r.status_code == 409
    assert isinstance(r.json(), str)
    assert fn4.guids == {}
    assert insert(session, fn4, "g1", "ACGT").status_code == 200
    assert [(i.status, i.scripted) for i in fn4.inserts] == [(503, True), (409, True), (200, False)]


def test_scripted_answer_for_one_guid(fn4, session):
    fn4.script(Scripted(status=409, guid="b"))
    assert insert(session, fn4, "a", "ACGT").status_code == 200
    assert insert(session, fn4, "b", "ACGT").status_code == 409
    assert insert(session, fn4, "b", "ACGT").status_code == 200


def test_scripted_times(fn4, session):
    sc = Scripted(status=503, times=2)
    fn4.script(sc)
    assert [insert(session, fn4, "g", "ACGT").status_code for _ in range(3)] == [503, 503, 200]
    assert sc.times == 2   # the queued copy is consumed, not the caller's object
    fn4.script(Scripted(status=409, times=-1))
    assert [insert(session, fn4, "h", "ACGT").status_code for _ in range(5)] == [409] * 5
    fn4.clear_script()
    assert insert(session, fn4, "h", "ACGT").status_code == 200


def test_scripted_default_bodies_and_custom_body(fn4, session):
    fn4.script(Scripted(status=500), Scripted(status=200), Scripted(status=201),
               Scripted(status=502, body="<html>bad gateway</html>", content_type="text/html"))
    r = insert(session, fn4, "g1", "ACGT")
    assert r.status_code == 500 and "<title>500 Internal Server Error</title>" in r.text
    assert insert(session, fn4, "g1", "ACGT").json() == "Guid g1 inserted."
    assert insert(session, fn4, "g1", "ACGT").json() == "Guid g1 is already present"
    r = insert(session, fn4, "g1", "ACGT")
    assert (r.status_code, r.text) == (502, "<html>bad gateway</html>")
    assert r.headers["Content-Type"] == "text/html"
    assert fn4.guids == {}   # scripted answers do not store by default


def test_scripted_200_can_store(fn4, session):
    fn4.script(Scripted(status=200, store=True))
    assert insert(session, fn4, "g1", "acgt").status_code == 200
    assert fn4.guids == {"g1": "ACGT"}


def test_scripted_routes(fn4, session):
    insert(session, fn4, "g1", "ACGT")
    fn4.script(Scripted(status=200, route="guids", body='["x", "y"]'),
               Scripted(status=200, route="exists", guid="g2", body="true"),
               Scripted(status=503, route="server_time"))
    assert get(session, fn4, "/api/v2/guids").json() == ["x", "y"]
    assert get(session, fn4, "/api/v2/g1/exists").json() is True    # not about g2: real answer
    assert get(session, fn4, "/api/v2/g2/exists").json() is True
    assert get(session, fn4, "/api/v2/g2/exists").json() is False   # consumed
    assert get(session, fn4, "/api/v2/server_time").status_code == 503
    fn4.script(Scripted(status=502, route="*"), Scripted(status=409, route="*", guid="g1"))
    assert get(session, fn4, "/api/v2/server_name").status_code == 502
    assert get(session, fn4, "/api/v2/guids").json() == ["g1"]
    assert insert(session, fn4, "g2", "ACGT").status_code == 200
    assert get(session, fn4, "/api/v2/g1/exists").status_code == 409
    with pytest.raises(ValueError):
        Scripted(route="nonsense")


def test_scripted_delay_is_honoured_server_side(fn4, session):
    fn4.script(Scripted(status=200, store=True, delay=0.2))
    t0 = time.perf_counter()
    assert insert(session, fn4, "g1", "ACGT").status_code == 200
    assert time.perf_counter() - t0 >= 0.2
    rec = fn4.inserts[-1]
    assert rec.scripted and rec.ended - rec.started >= 0.2


def test_scripted_delay_makes_client_time_out(fn4, session):
    fn4.script(Scripted(status=200, delay=5))
    with pytest.raises(requests.exceptions.ReadTimeout):
        insert(session, fn4, "g1", "ACGT", timeout=0.2)
    assert insert(session, fn4, "g1", "ACGT").status_code == 200


def test_scripted_drop_closes_the_connection(fn4, session):
    fn4.script(Scripted(drop=True, route="*"))
    with pytest.raises(requests.exceptions.ConnectionError):
        insert(session, fn4, "g1", "ACGT")
    assert fn4.requests[-1].status == 0
    assert fn4.inserts[-1].status == 0
    assert insert(session, fn4, "g1", "ACGT").status_code == 200


def test_scripted_text_headers_and_404(fn4, session):
    fn4.script(Scripted(status=429, headers={"Retry-After": "30"}),
               Scripted(status=500, text="Could not connect to database. Tried 3 times"),
               Scripted(status=404))
    r = insert(session, fn4, "g1", "ACGT")
    assert (r.status_code, r.headers["Retry-After"]) == (429, "30")
    r = insert(session, fn4, "g1", "ACGT")
    assert r.status_code == 500 and "<p>Could not connect to database. Tried 3 times</p>" in r.text
    r = insert(session, fn4, "g1", "ACGT")
    assert r.status_code == 404 and "mis-routing" in r.json()["error"]


def test_scripted_drop_can_store(fn4, session):
    fn4.script(Scripted(drop=True, store=True))
    with pytest.raises(requests.exceptions.ConnectionError):
        insert(session, fn4, "g1", "ACGT")
    assert fn4.guids == {"g1": "ACGT"}
    assert insert(session, fn4, "g1", "ACGT").status_code == 201


def test_database_down_fails_the_routes_that_ask_it(fn4, session):
    fn4.database_down = True
    for response in (insert(session, fn4, "g1", "ACGT"), get(session, fn4, "/api/v2/guids"),
                     get(session, fn4, "/api/v2/g1/exists")):
        assert response.status_code == 500 and "Could not connect to database" in response.text
    assert get(session, fn4, "/api/v2/server_time").status_code == 200
    assert fn4.guids == {} and fn4.inserts[-1].status == 500
    fn4.database_down = False
    assert insert(session, fn4, "g1", "ACGT").status_code == 200


def test_idle_timeout_closes_kept_alive_connections(fn4):
    fn4.idle_timeout = 0.2
    with socket.create_connection(("127.0.0.1", fn4.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /api/v2/server_time HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while True:   # the answer, then the end of the stream once the connection has been idle 0.2 s
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    assert received.startswith(b"HTTP/1.1 200") and received.count(b"HTTP/1.1") == 1


def test_lock_conflicts_answer_409_while_an_insert_runs(fn4):
    fn4.lock_conflicts = True
    fn4.insert_delay = 0.5
    with ThreadPoolExecutor(2) as pool, requests.Session() as s1, requests.Session() as s2:
        first = pool.submit(insert, s1, fn4, "g1", "ACGT")
        deadline = time.monotonic() + TIMEOUT
        while fn4.inserts_begun == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        second = insert(s2, fn4, "g2", "ACGT")
        assert second.status_code == 409 and first.result(TIMEOUT).status_code == 200
    assert list(fn4.guids) == ["g1"]


# ------------------------------------------------------------------ outage

def test_down_answers_503_then_recovers(fn4, session):
    insert(session, fn4, "g1", "ACGT")
    fn4.down = True
    assert get(session, fn4, "/api/v2/guids").status_code == 503
    assert get(session, fn4, "/api/v2/server_time").status_code == 503
    assert insert(session, fn4, "g2", "ACGT").status_code == 503
    fn4.down = False
    assert sorted(get(session, fn4, "/api/v2/guids").json()) == ["g1"]


def test_down_refuse_closes_connections(fn4, session):
    assert get(session, fn4, "/api/v2/server_time").status_code == 200   # a live keep-alive connection
    fn4.down_mode = "refuse"
    fn4.down = True
    with pytest.raises(requests.exceptions.ConnectionError):
        get(session, fn4, "/api/v2/server_time")
    with requests.Session() as fresh, pytest.raises(requests.exceptions.ConnectionError):
        get(fresh, fn4, "/api/v2/server_time")
    fn4.down = False
    assert get(session, fn4, "/api/v2/server_time").status_code == 200


def test_stop_ends_keep_alive_connections():
    fn4 = FN4StandIn().start()
    with requests.Session() as s:
        assert get(s, fn4, "/api/v2/guids").status_code == 200
        fn4.stop()
        with pytest.raises(requests.exceptions.ConnectionError):
            get(s, fn4, "/api/v2/guids")


# ------------------------------------------------------------------ TCP proxy

class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        try:
            while True:
                data = self.request.recv(65536)
                if not data:
                    return
                self.request.sendall(data)
        except OSError:
            return


@pytest.fixture
def echo_server():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _EchoHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(echo_server):
    with TCPProxy("127.0.0.1", echo_server.server_address[1]) as p:
        yield p


def connect(port):
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def echo(sock, payload):
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def assert_closed_by_peer(sock):
    try:
        sock.sendall(b"ping")
        assert sock.recv(16) == b""
    except (ConnectionResetError, BrokenPipeError):
        pass


def assert_rejected(port):
    """A new connection is accepted and then reset (the reset may even beat connect() returning)."""
    try:
        sock = connect(port)
    except ConnectionResetError:
        return
    with sock:
        assert_closed_by_peer(sock)


def test_proxy_relays(proxy):
    with connect(proxy.port) as a, connect(proxy.port) as b:
        assert echo(a, b"hello") == b"hello"
        big = os.urandom(1 << 20)
        assert echo(b, big) == big
        assert proxy.active_connections == 2
    assert proxy.accepted == 2


def test_proxy_cut_closes_live_connections_and_resets_new_ones(proxy):
    port = proxy.port
    with connect(port) as live:
        assert echo(live, b"x") == b"x"
        proxy.cut()
        assert proxy.is_cut and proxy.active_connections == 0
        assert_closed_by_peer(live)
    assert_rejected(port)
    assert proxy.rejected >= 1
    proxy.restore()
    assert proxy.port == port
    with connect(port) as again:
        assert echo(again, b"back") == b"back"


def test_proxy_cut_refuse_stops_listening(proxy):
    port = proxy.port
    live = connect(port)
    assert echo(live, b"x") == b"x"
    proxy.cut(refuse=True)
    assert_closed_by_peer(live)
    live.close()
    with pytest.raises(ConnectionRefusedError):
        connect(port)
    proxy.restore()
    assert proxy.port == port
    with connect(port) as again:
        assert echo(again, b"back") == b"back"


def test_proxy_bounds_connections(echo_server):
    with TCPProxy("127.0.0.1", echo_server.server_address[1], max_connections=1) as p:
        with connect(p.port) as first:
            assert echo(first, b"1") == b"1"
            assert_rejected(p.port)
            assert echo(first, b"still") == b"still"


def test_proxy_resets_when_target_is_down():
    dead_port = free_port()
    with TCPProxy("127.0.0.1", dead_port) as p:
        assert_rejected(p.port)
        assert p.rejected == 1


def test_proxy_stop_closes_everything(echo_server):
    p = TCPProxy("localhost", echo_server.server_address[1]).start()
    live = connect(p.port)
    assert echo(live, b"x") == b"x"
    p.stop()
    assert_closed_by_peer(live)
    live.close()
    with pytest.raises(ConnectionRefusedError):
        connect(p.port)


def test_proxy_is_loopback_only():
    with pytest.raises(ValueError):
        TCPProxy("192.0.2.1", 5432)


DB_URL_VARS = {
    "FN4_TEST_POSTGRES_URL": "postgresql+psycopg2://postgres@127.0.0.1:5432/test",
    "FN4_TEST_MARIADB_URL": "mysql+pymysql://root@127.0.0.1:3306/test",
}


@pytest.mark.parametrize("refuse", [False, True], ids=["reset", "refuse"])
@pytest.mark.parametrize("env_var", sorted(DB_URL_VARS))
def test_database_through_proxy_disappears_and_comes_back(env_var, refuse):
    raw = os.environ.get(env_var)
    if not raw:
        pytest.skip("{0} is not set; set it (e.g. {0}={1}) to test a database connection through "
                    "the proxy".format(env_var, DB_URL_VARS[env_var]))
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from sqlalchemy.pool import NullPool

    url = sqlalchemy.engine.make_url(raw)
    default_port = 3306 if url.get_backend_name().startswith("mysql") else 5432
    with TCPProxy(url.host or "127.0.0.1", url.port or default_port) as p:
        engine = sqlalchemy.create_engine(url.set(host="127.0.0.1", port=p.port), poolclass=NullPool,
                                          connect_args={"connect_timeout": 5})
        try:
            select1 = sqlalchemy.text("SELECT 1")
            with engine.connect() as conn:
                assert conn.execute(select1).scalar() == 1
                p.cut(refuse=refuse)
                with pytest.raises(sqlalchemy.exc.DBAPIError):
                    conn.execute(select1)
            with pytest.raises(sqlalchemy.exc.DBAPIError):
                with engine.connect() as conn:
                    conn.execute(select1)
            p.restore()
            with engine.connect() as conn:
                assert conn.execute(select1).scalar() == 1
        finally:
            engine.dispose()
