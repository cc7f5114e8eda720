"""``cyllm chat``: a conversation with a served model in the terminal, answers streamed."""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer

from cyllm.cli.client import DEFAULT_URL, ApiKey, Gateway, Url, _e, _fail, err, printable
from cyllm.cli.root import app


@app.command()
def chat(
    model: Annotated[
        str | None,
        typer.Argument(help="A served model id; default: the first the gateway lists.", show_default=False),
    ] = None,
    system: Annotated[str | None, typer.Option(help="A system prompt.", show_default=False)] = None,
    temperature: Annotated[
        float | None,
        typer.Option(min=0, max=2, help="Sampling temperature; default: the model's.", show_default=False),
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens per answer at most.")] = 512,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Chat in the terminal, answers streamed; the conversation is kept until /reset.

    Type a message and Enter (arrow keys edit the line and recall earlier ones); Ctrl-C
    stops an answer, /reset forgets the conversation, /exit (or Ctrl-D) leaves.  A
    refused message is not kept: send it again, or another.
    """
    gw = Gateway(url, api_key)
    if model is None:
        served = gw.call("GET", "/v1/models")["data"]
        if not served:
            _fail("the gateway serves no model")
        model = served[0]["id"]
    interactive = sys.stdin.isatty()
    refused = False  # piped: the exit status says whether every message was answered
    if interactive:
        try:
            import readline  # noqa: F401  (input() gets line editing and this session's history)
        except ImportError:  # not on every platform: plain input()
            pass

        err.print(
            f"[bold]{_e(model)}[/] at {_e(url)} — Ctrl-C stops an answer; /reset, /exit", highlight=False
        )
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            raise typer.Exit(1 if refused else 0) from None
        except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
            sys.stdout.write("\n")
            continue
        if line.strip() == "/exit":
            raise typer.Exit(1 if refused else 0)
        if line.strip() == "/reset":
            history = history[:1] if system else []
            err.print("[dim](conversation reset)[/]")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        body: dict[str, Any] = {
            "model": model,
            "messages": history,
            "stream": True,
            "max_tokens": max_tokens,
            "stream_options": {"include_usage": True},
        }
        if temperature is not None:
            body["temperature"] = temperature
        answer: list[str] = []
        usage, first, start = None, None, time.perf_counter()
        events = gw.events("/v1/chat/completions", method="POST", json=body)
        try:
            for _, data in events:
                if data == "[DONE]":
                    break
                if "error" in data:
                    _fail(data["error"].get("message", "the generation failed"))
                usage = data.get("usage") or usage
                for choice in data.get("choices", ()):
                    piece = choice["delta"].get("content") or ""
                    if piece and first is None:
                        first = time.perf_counter()
                    answer.append(piece)
                    sys.stdout.write(printable(piece))
                    sys.stdout.flush()
        except KeyboardInterrupt:  # the answer stops (the server cancels it); the chat goes on
            events.close()
            err.print("\n[dim](stopped)[/]", highlight=False)
            usage = None
        except typer.Exit:  # refused or failed: said above; the conversation stays as it was
            events.close()
            history.pop()
            refused = not interactive
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(answer)})
        if usage and first is not None:
            took = time.perf_counter() - first
            rate = usage["completion_tokens"] / took if took > 0 else 0.0
            err.print(
                f"[dim]{_e(usage['completion_tokens'])} tokens, first after "
                f"{(first - start) * 1000:.0f} ms, {rate:.1f} tokens/s[/]",
                highlight=False,
            )
