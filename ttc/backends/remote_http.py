"""The remote backend's HTTP client: JSON over a bounded pool of threads, with retries.

    client = HttpClient("http://localhost:8000/v1", api_key=None, max_concurrency=8, timeout_s=300, retries=4)
    client.post("completions", body)            # one request -> its JSON
    client.post_all("completions", bodies)      # at most max_concurrency at once, answers in order

Strategies call their proposer synchronously, so the client is synchronous too: an `httpx.Client`
(thread-safe, one connection pool of `max_concurrency`) driven by a pool of as many threads.

A request is retried, with exponential backoff (and the server's Retry-After where given), on 429, on
5xx and on a dropped or timed-out connection; any other 4xx fails at once. Every failure is a
`RemoteError` with one line: the URL, the status and the server's own message. `cancel()` makes every
waiting and later request raise `ttc.decoder.concurrent.Cancelled` (the eval runner's Ctrl-C).
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import httpx

from ttc.decoder.concurrent import Cancelled

__all__ = ["HttpClient", "RemoteError"]

RETRY_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
MAX_BACKOFF_S = 30.0


class RemoteError(RuntimeError):
    """A server answered with an error, never answered, or lacks a feature asked of it (one line)."""


def server_message(response: httpx.Response) -> str:
    """The error text of a response: OpenAI's {"error": {"message"}}, vLLM's {"message"}, FastAPI's {"detail"}."""
    try:
        data = response.json()
    except ValueError:
        return response.text.strip().replace("\n", " ")[:500] or response.reason_phrase
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        for key in ("message", "detail", "error"):
            if data.get(key):
                value = data[key]
                return value if isinstance(value, str) else json.dumps(value)[:500]
    return json.dumps(data)[:500]


class HttpClient:
    """JSON requests to one base URL. `transport` replaces the network (httpx.MockTransport in tests)."""

    def __init__(self, base_url: str, api_key: str | None = None, max_concurrency: int = 8, timeout_s: float = 300.0,
                 retries: int = 4, backoff_s: float = 0.5, transport: httpx.BaseTransport | None = None):
        if max_concurrency < 1 or retries < 0 or timeout_s <= 0:
            raise ValueError("max_concurrency must be at least 1, retries nonnegative, timeout_s positive")
        self.base_url = base_url.rstrip("/")
        self.retries, self.backoff_s = retries, backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url + "/", headers=headers, timeout=timeout_s,
                                  limits=httpx.Limits(max_connections=max_concurrency,
                                                      max_keepalive_connections=max_concurrency),
                                  transport=transport)
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="ttc-remote")
        self._stop = threading.Event()  # set by cancel(): backoff sleeps wake up, requests fail
        self._cancelled: BaseException | None = None
        self.requests = 0  # HTTP attempts made (retries included), for tests and logs
        self._requests_lock = threading.Lock()  # every worker thread and the pool's threads count here

    # -- requests ------------------------------------------------------------------------------------

    def get(self, path: str) -> dict:
        return self._request("GET", path, None)

    def post(self, path: str, body: dict) -> dict:
        return self._request("POST", path, body)

    def post_all(self, path: str, bodies: list[dict]) -> list[dict]:
        """Every body posted, at most `max_concurrency` at a time; the answers in the bodies' order. The
        first failure is raised once the requests already running are done (the others are not sent)."""
        if len(bodies) <= 1:
            return [self.post(path, b) for b in bodies]
        futures = [self._pool.submit(self.post, path, b) for b in bodies]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f in done and f.exception() is not None), None)
        if failed is not None:
            for f in pending:
                f.cancel()
            wait(pending)
            raise failed.exception()
        return [f.result() for f in futures]

    def _request(self, method: str, path: str, body: dict | None) -> dict:
        url = f"{self.base_url}/{path.lstrip('/')}"
        for attempt in range(self.retries + 1):
            self._check_cancelled()
            last = attempt == self.retries
            with self._requests_lock:
                self.requests += 1
            try:
                response = self._http.request(method, path.lstrip("/"), json=body)
            except httpx.TransportError as e:  # refused, dropped, timed out
                if last:
                    raise RemoteError(f"{method} {url}: {type(e).__name__}: {e or 'no answer'} "
                                      f"(after {attempt + 1} attempts)") from None
                self._sleep(attempt, None)
                continue
            if response.status_code < 400:
                try:
                    return response.json()
                except ValueError:
                    raise RemoteError(f"{method} {url}: HTTP {response.status_code} with a body that is not JSON: "
                                      f"{response.text[:200]!r}") from None
            message = server_message(response)
            if response.status_code not in RETRY_STATUS:
                raise RemoteError(f"{method} {url}: HTTP {response.status_code}: {message}")
            if last:
                raise RemoteError(f"{method} {url}: HTTP {response.status_code} (after {attempt + 1} attempts): "
                                  f"{message}")
            self._sleep(attempt, response.headers.get("retry-after"))
        raise AssertionError("unreachable")

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff_s * (2 ** attempt)
        try:
            delay = max(delay, float(retry_after)) if retry_after else delay
        except ValueError:
            pass  # an HTTP date: keep our own backoff
        self._stop.wait(min(delay, MAX_BACKOFF_S))

    # -- lifetime ------------------------------------------------------------------------------------

    def _check_cancelled(self) -> None:
        if self._cancelled is not None:
            raise Cancelled("the remote backend was cancelled") from self._cancelled

    def cancel(self, reason: BaseException | None = None) -> None:
        """Fail every waiting and later request with Cancelled (requests on the wire finish first)."""
        self._cancelled = reason or Cancelled("cancelled")
        self._stop.set()

    def reopen(self) -> None:
        """Take requests again after cancel()."""
        self._cancelled = None
        self._stop.clear()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._http.close()
