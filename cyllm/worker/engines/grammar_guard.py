"""A caller's JSON schema is compiled first in a child process that is killed when it
takes too long.

xgrammar's compile time is not bounded by a schema's size: a 250 KB schema of
patterned properties took over two minutes of CPU here, nested ``oneOf`` grows
exponentially, and the compiler has no deadline or cancellation of its own.  Compiled in
the worker, such a schema would hold the thread that compiles it for minutes; on the
event loop it would stall every stream of the worker, long enough for the coordinator
to fail its requests over to another worker, which would be handed the same schema.
A thread with a timeout answers the caller but cannot stop the compile: the CPU stays
spent, and each retry adds another.

So every new schema is compiled first in a child process (spawned, not forked: the
worker holds gRPC's threads), one at a time, under a deadline, the tenants taking
turns (:class:`FairTurns`): one tenant's queue of slow schemas delays another's new
schema by one deadline at most, not by the whole queue.  One that compiles in
time is compiled again in the worker, off the event loop, taking about as long; past
the deadline the child is killed, its CPU and memory with it, the caller gets a 400,
and the next schema starts a new child.  A compile costs twice the CPU of one (a few
milliseconds for ordinary schemas); the child, about 2 s to start, starts with the
first schema the worker sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import multiprocessing
import re
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from typing import Any

from cyllm import errors

PARAM = "response_format"
START_TIMEOUT_S = 120.0  # importing xgrammar (and torch) in a new interpreter
MEMORY_BYTES = 2 << 30  # address space a compile may add to the child's
_SOURCE = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


def compile_schema(compiler: Any, schema: str) -> Any:
    """``schema`` compiled by an xgrammar ``GrammarCompiler``: compact JSON (no free
    whitespace: a small model given it may spend its whole budget on blank lines), no
    properties beyond the schema's."""
    return compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=True)


def refusal(exc: Exception) -> str:
    """What the compiler said, without its log prefix (time, file:line)."""
    return _SOURCE.sub("", str(exc)).strip()


# Whose schema a compile is for: set by the worker for each generation (the tenant's
# key from its request), read where the compile is queued.
COMPILING_FOR: contextvars.ContextVar[str] = contextvars.ContextVar("compiling_for", default="")


class FairTurns:
    """One holder at a time; waiters queue per tenant, and the tenants take turns: the
    next turn goes to the first tenant in line other than the one just served (it goes
    to the back), so a tenant waits for at most one turn of each other tenant."""

    def __init__(self) -> None:
        self._queues: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        self._busy = False
        self._last = ""

    @contextlib.asynccontextmanager
    async def turn(self, tenant: str) -> AsyncIterator[None]:
        if self._busy or self._queues:
            waiter = asyncio.get_running_loop().create_future()
            self._queues.setdefault(tenant, deque()).append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # granted as it was cancelled
                    self._pass_on()
                else:
                    self._drop(tenant, waiter)
                raise
        self._busy, self._last = True, tenant
        try:
            yield
        finally:
            self._pass_on()

    def _pass_on(self) -> None:
        while self._queues:
            tenant = next((t for t in self._queues if t != self._last), next(iter(self._queues)))
            line = self._queues[tenant]
            waiter = line.popleft()
            if line:
                self._queues.move_to_end(tenant)
            else:
                del self._queues[tenant]
            if not waiter.done():
                self._last = tenant
                waiter.set_result(None)  # busy stays True: it is theirs now
                return
        self._busy = False

    def _drop(self, tenant: str, waiter: asyncio.Future[None]) -> None:
        line = self._queues.get(tenant)
        if line is not None and waiter in line:
            line.remove(waiter)
            if not line:
                del self._queues[tenant]


class CompileGuard:
    """The child process that tries each schema first: one per worker process (it holds
    torch, about 280 MB), shared by the vocabularies of its models, so a schema that
    runs to the deadline delays the others' new schemas, never more than that."""

    def __init__(self, memory_bytes: int = MEMORY_BYTES) -> None:
        self.memory_bytes = memory_bytes
        self._process: Any = None
        self._conn: Any = None
        self._known: set[int] = set()  # vocabularies the child holds
        self._forgotten: set[int] = set()  # of those, the ones it may drop (told next time)
        self._vocabularies = itertools.count(1)
        self._turns: FairTurns | None = None
        self._turns_loop: asyncio.AbstractEventLoop | None = None

    def vocabulary(self) -> int:
        """A number for a new vocabulary (passed to ``check`` and ``forget``)."""
        return next(self._vocabularies)

    async def check(
        self, vocabulary: int, info: Any, schema: str, timeout_s: float, tenant: str = ""
    ) -> None:
        """Return when ``schema`` compiles for ``info`` (an xgrammar ``TokenizerInfo``)
        within ``timeout_s``; else InvalidRequest naming why (the compiler's own
        message, or the deadline).  ``tenant``: whose schema it is (they take turns).
        Not to be cancelled (the child's answer would go to the next schema): run it
        shielded."""
        async with self._fair().turn(tenant):
            try:
                for gone in self._forgotten:  # no answer to wait for
                    await asyncio.to_thread(self._conn.send, ("forget", gone, None))
            except OSError:  # the child died meanwhile: a new one holds nothing
                self.close()
            self._known -= self._forgotten
            self._forgotten.clear()
            if self._process is None:
                await self._start()
            if vocabulary not in self._known:
                info_json = await asyncio.to_thread(info.serialize_json)
                try:
                    await self._ask(("vocabulary", vocabulary, info_json), START_TIMEOUT_S)
                except (TimeoutError, EOFError, OSError):
                    self.close()
                    raise errors.EngineError(
                        "the grammar compiler's process did not take the vocabulary"
                    ) from None
                self._known.add(vocabulary)
            try:
                refusal = await self._ask(("compile", vocabulary, schema), timeout_s)
            except TimeoutError:
                self.close()
                raise errors.InvalidRequest(
                    f"the JSON schema did not compile for constrained decoding within "
                    f"{timeout_s:g} s; simplify it (fewer patterns, less nesting of "
                    f"anyOf/oneOf)",
                    param=PARAM,
                ) from None
            except asyncio.CancelledError:  # (the worker stopping) its answer would be stale
                self.close()
                raise
            except (EOFError, OSError):  # the child died: out of memory, or killed
                self.close()
                raise errors.InvalidRequest(
                    "the JSON schema could not be compiled for constrained decoding (the "
                    "compiler ran out of resources); simplify it",
                    param=PARAM,
                ) from None
        if refusal is not None:
            raise errors.InvalidRequest(
                f"the JSON schema cannot be used for constrained decoding: {refusal}", param=PARAM
            )

    def forget(self, vocabulary: int) -> None:
        """The child may drop ``vocabulary`` (its model was unloaded): told with the next
        question, under the lock (a message sent now could cut into one being sent)."""
        if vocabulary in self._known:
            self._forgotten.add(vocabulary)

    def _fair(self) -> FairTurns:
        """One question at a time, on whichever event loop asks (tests run several)."""
        loop = asyncio.get_running_loop()
        if self._turns is None or self._turns_loop is not loop:
            self._turns, self._turns_loop = FairTurns(), loop
        return self._turns

    async def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        process = ctx.Process(
            target=_serve, args=(theirs, self.memory_bytes), daemon=True, name="cyllm-grammar-check"
        )
        await asyncio.to_thread(process.start)
        theirs.close()
        self._process, self._conn = process, ours
        try:
            await asyncio.wait_for(self._reply(), START_TIMEOUT_S)
        except (TimeoutError, EOFError, OSError):
            self.close()
            raise errors.EngineError("the grammar compiler's process did not start") from None

    async def _ask(self, message: tuple[str, int, Any], timeout_s: float) -> Any:
        await asyncio.to_thread(self._conn.send, message)
        return await asyncio.wait_for(self._reply(), timeout_s)

    async def _reply(self) -> Any:
        """The child's next message, awaited without holding a thread."""
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = self._conn.fileno()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
        return self._conn.recv()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def close(self) -> None:
        """Kill the child (a compile in progress dies with it); the next check starts
        another."""
        process, conn, self._process, self._conn = self._process, self._conn, None, None
        self._known.clear()
        self._forgotten.clear()
        if process is not None:
            process.kill()
            process.join(5)
            process.close()
        if conn is not None:
            conn.close()


guard = CompileGuard()


def _serve(conn: Any, memory_bytes: int) -> None:
    """The child: hold vocabularies, compile each schema asked, answer None or the
    compiler's refusal.  Each compile may grow the child's address space by
    ``memory_bytes`` at most; past it the compile fails or the child dies, and the
    caller is told the compiler ran out of resources."""
    import resource

    import xgrammar as xgr

    def bound_memory() -> None:
        with contextlib.suppress(OSError, ValueError):
            with open("/proc/self/statm") as statm:
                size = int(statm.read().split()[0]) * resource.getpagesize()
            resource.setrlimit(resource.RLIMIT_AS, (size + memory_bytes, resource.RLIM_INFINITY))

    compilers: dict[int, Any] = {}
    conn.send(None)  # ready
    while True:
        try:
            op, vocabulary, arg = conn.recv()
        except (EOFError, OSError):
            return  # the worker is gone
        if op == "vocabulary":
            info = xgr.TokenizerInfo.deserialize_json(arg)
            compilers[vocabulary] = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            conn.send(None)
        elif op == "forget":
            compilers.pop(vocabulary, None)
        else:
            bound_memory()
            try:
                compile_schema(compilers[vocabulary], arg)
                conn.send(None)
            except Exception as exc:
                if isinstance(exc, MemoryError) or "bad_alloc" in str(exc):
                    conn.send(f"its grammar needs more than the {memory_bytes >> 20} MiB a compile may use")
                else:
                    conn.send(refusal(exc))
