"""Check llmaas's OpenAI-compatible API with one Python client library: litellm, langchain-openai, httpx or aiohttp.

Run by scripts/check_clients.sh in its own venv (the client libraries are not llmaas dependencies):

    python check_python_clients.py CLIENT --base-url http://127.0.0.1:PORT --key KEY

Each client lists the models and uses the returned id, then makes a plain chat completion (system + user message,
greedy), the same request streamed (the concatenated deltas must equal the plain reply), and one call on a persistent
context through the extension field `"llmaas": {"context_id": ...}` with only the new user message; the context must
then hold that turn (GET /v1/contexts/{id}). Prints exactly one line on stdout, `PASS CLIENT` or `FAIL CLIENT: reason`,
and exits 0 or 1; details go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import sys
import time
import traceback
import urllib.error
import urllib.request

SYSTEM = "You are a terse assistant. Answer in a few words."
USER = "Name a primary colour."
CONTEXT_SYSTEM = "You are a helpful assistant who answers in one short sentence."
CONTEXT_USER = "What is the capital of France?"
MAX_TOKENS = 8
TIMEOUT_S = 120
T0 = time.monotonic()
CLIENTS = ("litellm", "langchain-openai", "httpx", "aiohttp")


class CheckFailed(Exception):
    pass


def _http_error(status: int, text: str) -> CheckFailed:
    return CheckFailed(f"HTTP {status}: {text.strip()[:400]}")


# -- a stdlib helper, for the llmaas-only routes (contexts) where the library has no generic HTTP call -----------------


class Stdlib:
    def __init__(self, base_url: str, key: str):
        self.base_url, self.key = base_url.rstrip("/"), key

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise _http_error(e.code, e.read().decode(errors="replace")) from None

    def create_context(self, system_prompt: str) -> str:
        return self.request("POST", "/v1/contexts", {"system_prompt": system_prompt})["id"]

    def get_context(self, context_id: str) -> dict:
        return self.request("GET", f"/v1/contexts/{context_id}")


# -- one adapter per library: list_models, chat, stream, create_context, get_context -----------------------------------


class Litellm(Stdlib):
    """litellm.completion(model="openai/<id>", api_base=..., api_key=..., extra_body=...)."""

    def __init__(self, base_url: str, key: str):
        super().__init__(base_url, key)
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of the price list
        import litellm
        litellm.suppress_debug_info = True
        litellm.telemetry = False
        self.litellm = litellm

    def list_models(self) -> list[str]:
        ids = self.litellm.get_valid_models(check_provider_endpoint=True, custom_llm_provider="openai",
                                            api_key=self.key, api_base=self.base_url + "/v1")
        # litellm swallows listing errors and answers []; an empty list is a failure here
        return [m.removeprefix("openai/") for m in ids]

    def _completion(self, model: str, messages: list[dict], extra_body: dict | None, stream: bool):
        kw = {"extra_body": extra_body} if extra_body else {}
        return self.litellm.completion(model=f"openai/{model}", api_base=self.base_url + "/v1", api_key=self.key,
                                       messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=stream,
                                       num_retries=0, timeout=TIMEOUT_S, **kw)

    def chat(self, model: str, messages: list[dict], extra_body: dict | None = None) -> tuple[str, str]:
        r = self._completion(model, messages, extra_body, False)
        return r.choices[0].message.content, r.choices[0].finish_reason

    def stream(self, model: str, messages: list[dict]) -> list[str]:
        return [c.choices[0].delta.content or "" for c in self._completion(model, messages, None, True) if c.choices]


class LangchainOpenAI(Stdlib):
    """ChatOpenAI(model=<id>, base_url=..., api_key=..., extra_body=...). langchain-openai has no model listing: the
    listing goes through the openai client that ChatOpenAI itself holds (`root_client.models.list()`)."""

    def __init__(self, base_url: str, key: str):
        super().__init__(base_url, key)
        from langchain_core.messages import HumanMessage, SystemMessage
        from langchain_openai import ChatOpenAI
        self.ChatOpenAI, self.types = ChatOpenAI, {"system": SystemMessage, "user": HumanMessage}

    def _llm(self, model: str, extra_body: dict | None = None):
        kw = {"extra_body": extra_body} if extra_body else {}
        return self.ChatOpenAI(model=model, base_url=self.base_url + "/v1", api_key=self.key, max_tokens=MAX_TOKENS,
                               temperature=0, max_retries=0, timeout=TIMEOUT_S, **kw)

    def _messages(self, messages: list[dict]) -> list:
        return [self.types[m["role"]](content=m["content"]) for m in messages]

    def list_models(self) -> list[str]:
        return [m.id for m in self._llm("unused").root_client.models.list()]

    def chat(self, model: str, messages: list[dict], extra_body: dict | None = None) -> tuple[str, str]:
        r = self._llm(model, extra_body).invoke(self._messages(messages))
        return r.content, r.response_metadata.get("finish_reason")

    def stream(self, model: str, messages: list[dict]) -> list[str]:
        return [c.content for c in self._llm(model).stream(self._messages(messages))]


def _sse_data(line: str) -> dict | None:
    """One SSE line of a chat stream: its JSON, or None for blank lines, comments and [DONE]."""
    line = line.strip()
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    event = json.loads(data)
    if "error" in event:
        raise CheckFailed(f"error event in the stream: {data[:400]}")
    return event


def _deltas(events: list[dict]) -> list[str]:
    return [e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices")]


def _body(model: str, messages: list[dict], extra_body: dict | None = None, stream: bool = False) -> dict:
    return {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0,
            **({"stream": True} if stream else {}), **(extra_body or {})}


class Httpx:
    """httpx.Client with plain JSON requests; the stream is parsed from its SSE lines."""

    def __init__(self, base_url: str, key: str):
        import httpx
        self.client = httpx.Client(base_url=base_url.rstrip("/") + "/v1", timeout=TIMEOUT_S,
                                   headers={"Authorization": f"Bearer {key}"})

    def _json(self, method: str, path: str, body: dict | None = None) -> dict:
        r = self.client.request(method, path, json=body)
        if r.status_code >= 300:
            raise _http_error(r.status_code, r.text)
        return r.json()

    def list_models(self) -> list[str]:
        return [m["id"] for m in self._json("GET", "/models")["data"]]

    def chat(self, model: str, messages: list[dict], extra_body: dict | None = None) -> tuple[str, str]:
        choice = self._json("POST", "/chat/completions", _body(model, messages, extra_body))["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]

    def stream(self, model: str, messages: list[dict]) -> list[str]:
        with self.client.stream("POST", "/chat/completions", json=_body(model, messages, stream=True)) as r:
            if r.status_code >= 300:
                raise _http_error(r.status_code, r.read().decode(errors="replace"))
            return _deltas([e for line in r.iter_lines() if (e := _sse_data(line)) is not None])

    def create_context(self, system_prompt: str) -> str:
        return self._json("POST", "/contexts", {"system_prompt": system_prompt})["id"]

    def get_context(self, context_id: str) -> dict:
        return self._json("GET", f"/contexts/{context_id}")


class Aiohttp:
    """aiohttp.ClientSession with plain JSON requests; the stream is parsed from its SSE lines."""

    def __init__(self, base_url: str, key: str):
        self.base_url, self.key, self.session = base_url.rstrip("/") + "/v1", key, None

    async def _session(self):
        if self.session is None:
            import aiohttp
            self.session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.key}"},
                                                 timeout=aiohttp.ClientTimeout(total=TIMEOUT_S))
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def _json(self, method: str, path: str, body: dict | None = None) -> dict:
        s = await self._session()
        async with s.request(method, self.base_url + path, json=body) as r:
            if r.status >= 300:
                raise _http_error(r.status, await r.text())
            return await r.json()

    async def list_models(self) -> list[str]:
        return [m["id"] for m in (await self._json("GET", "/models"))["data"]]

    async def chat(self, model: str, messages: list[dict], extra_body: dict | None = None) -> tuple[str, str]:
        choice = (await self._json("POST", "/chat/completions", _body(model, messages, extra_body)))["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]

    async def stream(self, model: str, messages: list[dict]) -> list[str]:
        s = await self._session()
        async with s.post(self.base_url + "/chat/completions", json=_body(model, messages, stream=True)) as r:
            if r.status >= 300:
                raise _http_error(r.status, await r.text())
            events = []
            async for raw in r.content:  # one line at a time
                if (e := _sse_data(raw.decode())) is not None:
                    events.append(e)
            return _deltas(events)

    async def create_context(self, system_prompt: str) -> str:
        return (await self._json("POST", "/contexts", {"system_prompt": system_prompt}))["id"]

    async def get_context(self, context_id: str) -> dict:
        return await self._json("GET", f"/contexts/{context_id}")


ADAPTERS = {"litellm": Litellm, "langchain-openai": LangchainOpenAI, "httpx": Httpx, "aiohttp": Aiohttp}


# -- the checks, the same for every client ---------------------------------------------------------------------------


async def _await(value):
    return await value if inspect.isawaitable(value) else value


def note(text: str) -> None:
    print(f"  [{time.monotonic() - T0:5.1f} s] {text}", file=sys.stderr, flush=True)


async def run_checks(adapter) -> None:
    step = "list models"
    try:
        ids = await _await(adapter.list_models())
        if not ids:
            raise CheckFailed("no model listed")
        model = ids[0]
        note(f"model: {model!r}")

        step = "plain chat"
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
        reply, finish = await _await(adapter.chat(model, messages))
        note(f"plain reply: {reply!r} (finish_reason {finish!r})")
        if not isinstance(reply, str) or not reply:
            raise CheckFailed(f"empty or non-text reply {reply!r}")
        if finish not in ("stop", "length"):
            raise CheckFailed(f"finish_reason {finish!r}")

        step = "streamed chat"
        deltas = await _await(adapter.stream(model, messages))
        streamed = "".join(deltas)
        note(f"streamed reply: {streamed!r} ({len(deltas)} chunks)")
        if streamed != reply:
            raise CheckFailed(f"the stream {streamed!r} differs from the plain reply {reply!r} (both greedy)")

        step = "context call"
        ctx = await _await(adapter.create_context(CONTEXT_SYSTEM))
        extra = {"llmaas": {"context_id": ctx}}
        ctx_reply, _ = await _await(adapter.chat(model, [{"role": "user", "content": CONTEXT_USER}], extra))
        note(f"context {ctx}: reply {ctx_reply!r}")
        if not isinstance(ctx_reply, str) or not ctx_reply:
            raise CheckFailed(f"empty or non-text reply {ctx_reply!r}")
        held = await _await(adapter.get_context(ctx))
        turn = [(m["role"], m["content"]) for m in held["messages"]][-2:]
        if held["num_calls"] != 1 or turn != [("user", CONTEXT_USER), ("assistant", ctx_reply)]:
            raise CheckFailed(f"the context does not hold the turn (was llmaas.context_id sent?): num_calls "
                              f"{held['num_calls']}, last messages {turn!r}")
        note(f"the context holds the turn ({held['num_calls']} call)")
    except CheckFailed as exc:
        raise CheckFailed(f"{step}: {exc}") from None
    except Exception as exc:  # a library error: its type and first line say what the library objected to
        traceback.print_exc(file=sys.stderr)
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CheckFailed(f"{step}: {type(exc).__name__}: {first[:400]}") from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


async def main_async(args: argparse.Namespace) -> int:
    adapter = None
    try:
        adapter = ADAPTERS[args.client](args.base_url, args.key)
        await run_checks(adapter)
    except CheckFailed as exc:
        print(f"FAIL {args.client}: {_one_line(str(exc))}", flush=True)
        return 1
    except Exception as exc:  # import or construction error
        traceback.print_exc(file=sys.stderr)
        print(f"FAIL {args.client}: setup: {type(exc).__name__}: {_one_line(str(exc))[:400]}", flush=True)
        return 1
    finally:
        if adapter is not None and hasattr(adapter, "close"):
            await adapter.close()
    print(f"PASS {args.client}", flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("client", choices=CLIENTS)
    p.add_argument("--base-url", required=True, help="the service, without /v1: http://127.0.0.1:PORT")
    p.add_argument("--key", default=os.environ.get("LLMAAS_KEY"), help="the app's key (default: $LLMAAS_KEY)")
    args = p.parse_args()
    if not args.key:
        p.error("no key: --key or $LLMAAS_KEY")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
