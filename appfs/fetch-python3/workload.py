"""fetch (python3): fetches a URL over the VM's network (stdlib only) and
answers its HTTP status and body length; what went wrong otherwise.

    {"url": "http://10.99.0.2:8080/"}  ->  {"url": ..., "ok": true, "status": 200, "length": 1234}
    {"url": "http://127.0.0.1:9/"}     ->  {"url": ..., "ok": false, "reason": "ConnectionRefusedError"}

"timeout" (seconds, default 10) bounds the fetch. The function needs a
network: its VM is given one (multivm `network: true`, singlevm --net;
see this directory's `network` file)."""

import socket
import urllib.error
import urllib.request


def handle(request):
    url = request.get("url") if isinstance(request, dict) else None
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return {"ok": False, "reason": "the request needs an http(s) \"url\""}
    timeout = request.get("timeout", 10)
    if not isinstance(timeout, (int, float)) or not 0 < timeout <= 60:
        return {"url": url, "ok": False, "reason": "timeout must be 0-60 seconds"}
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            body = reply.read()
            return {"url": url, "ok": True, "status": reply.status, "length": len(body)}
    except urllib.error.HTTPError as e:
        return {"url": url, "ok": True, "status": e.code, "length": len(e.read())}
    except urllib.error.URLError as e:
        reason = e.reason
        return {"url": url, "ok": False, "reason": type(reason).__name__ if isinstance(reason, BaseException) else str(reason)}
    except (socket.timeout, TimeoutError):
        return {"url": url, "ok": False, "reason": "TimeoutError"}
    except OSError as e:
        return {"url": url, "ok": False, "reason": type(e).__name__}
