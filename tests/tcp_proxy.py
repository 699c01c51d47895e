"""A controllable loopback TCP proxy, to make a database (or any TCP server) vanish and come back.

Usage::

    with TCPProxy("127.0.0.1", 5432) as proxy:
        url = "postgresql+psycopg2://postgres@127.0.0.1:{0}/test".format(proxy.port)
        ...
        proxy.cut()        # live connections are closed; new ones are accepted then reset
        proxy.cut(refuse=True)   # ... or: stop listening, so new connections are refused
        proxy.restore()    # same port, connections are relayed again
        proxy.blackhole()  # live connections stay open but every byte is dropped; new ones are relayed
        proxy.blackhole(new=True)  # ... and new ones are accepted but never answered: a silent network
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading

__all__ = ["TCPProxy"]


def _is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def _reset(sock: socket.socket) -> None:
    """Close with an RST rather than a FIN (SO_LINGER 0)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Link:
    """One relayed connection: two pump threads; the last one to finish closes both sockets."""

    def __init__(self, proxy: "TCPProxy", client: socket.socket, upstream: socket.socket):
        self.proxy, self.client, self.upstream = proxy, client, upstream
        self.blackholed = False  # set by TCPProxy.blackhole(): read and drop, like a dead network path
        self._pending = 2
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._pump, args=(client, upstream), daemon=True),
                        threading.Thread(target=self._pump, args=(upstream, client), daemon=True)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def kill(self) -> None:
        _shutdown(self.client)
        _shutdown(self.upstream)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not self.blackholed:
                    dst.sendall(data)
        except OSError:
            _shutdown(src)
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)   # pass the half-close on
            except OSError:
                pass
            with self._lock:
                self._pending -= 1
                last = self._pending == 0
            if last:
                self.client.close()
                self.upstream.close()
                self.proxy._forget(self)


class TCPProxy:
    """Relays connections made to 127.0.0.1:``port`` to ``target_host:target_port`` (loopback only).

    ``cut()`` closes every live connection; until ``restore()``, new connections are accepted and
    immediately reset, or with ``cut(refuse=True)`` the port stops listening so connects are refused.
    At most ``max_connections`` links are relayed at once; extra connections are reset.
    """

    def __init__(self, target_host: str, target_port: int, port: int = 0, max_connections: int = 64,
                 connect_timeout: float = 5.0):
        if not _is_loopback(target_host):
            raise ValueError("TCPProxy only relays to loopback addresses, not {0!r}".format(target_host))
        self.target_host, self.target_port = target_host, int(target_port)
        self.port = port
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.accepted = 0        # connections accepted while relaying
        self.rejected = 0        # connections reset while cut or over max_connections
        self._cut = False
        self._refuse = False
        self._hold_new = False                 # set by blackhole(new=True)
        self._held: list[socket.socket] = []   # connections accepted and left unanswered meanwhile
        self._closed = threading.Event()   # set by the accept loop once it closed the listener
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    # ---- life cycle ----
    def start(self) -> "TCPProxy":
        if self._thread is None:
            self._stop.clear()
            self._listen()
            self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                            name="tcp-proxy-{0}".format(self.port))
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            held, self._held = self._held, []
        for sock in held:
            _reset(sock)
        self._kill_links()

    def __enter__(self) -> "TCPProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- control ----
    @property
    def is_cut(self) -> bool:
        return self._cut

    @property
    def active_connections(self) -> int:
        with self._lock:
            return len(self._links)

    def cut(self, refuse: bool = False) -> None:
        """Close all live connections; new ones are reset (or refused, if ``refuse``) until restore()."""
        with self._lock:
            self._cut = True
            self._refuse = refuse
            self._closed.clear()
        if refuse and self._thread is not None:
            self._closed.wait(timeout=5)   # the accept loop closes its own listener
        self._kill_links()

    def blackhole(self, new: bool = False) -> int:
        """Drop every byte of the live connections from now on, both ways, leaving them open (a half-open
        path, as when a firewall forgets a connection); new connections are relayed, or with ``new``
        accepted and held unanswered until restore() resets them. Returns how many live ones."""
        with self._lock:
            self._hold_new = new
            links = list(self._links)
        for link in links:
            link.blackholed = True
        return len(links)

    def restore(self) -> None:
        """Relay connections again, on the same port."""
        with self._lock:
            self._cut = self._refuse = self._hold_new = False
            held, self._held = self._held, []
            relisten = self._listener is None and self._thread is not None
        for sock in held:
            _reset(sock)
        if relisten:
            self._listen()

    # ---- internals ----
    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", self.port))
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        sock.settimeout(0.05)   # accept loop polls so that stop() and cut(refuse=True) take effect
        self.port = sock.getsockname()[1]
        with self._lock:
            self._listener = sock

    def _kill_links(self) -> None:
        with self._lock:
            links = list(self._links)
        for link in links:
            link.kill()
        for link in links:
            for t in link.threads:
                if t is not threading.current_thread():
                    t.join(timeout=5)

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if self._refuse and self._listener is not None:
                    self._listener.close()
                    self._listener = None
                if self._refuse:
                    self._closed.set()
                listener = self._listener
            if listener is None:
                self._stop.wait(0.05)
                continue
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                continue
            client.settimeout(None)
            with self._lock:
                if self._hold_new:
                    self._held.append(client)
                    continue
                refuse = self._cut or len(self._links) >= self.max_connections
            if refuse:
                self.rejected += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection((self.target_host, self.target_port),
                                                    timeout=self.connect_timeout)
            except OSError:
                self.rejected += 1
                _reset(client)
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(self, client, upstream)
            with self._lock:
                if self._cut:          # cut() raced with this accept
                    self.rejected += 1
                    _reset(client)
                    upstream.close()
                    continue
                self._links.add(link)
                self.accepted += 1
            link.start()
