"""How one sequence spends its time on a runner: prompt evaluation, then token after token.

Per-token time follows the runner's batch size, its GPUs' speed, a layer-split penalty and the
contention of other runners on the same GPUs; a prefill stalls the runner's other decodes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from proxy.emulator import text
from proxy.emulator.clock import Clock
from proxy.emulator.events import Done, Event, Faults, GenerateRequest, Token
from proxy.emulator.runner import Runner
from proxy.errors import RunnerFailed


async def run_sequence(
    runner: Runner,
    req: GenerateRequest,
    *,
    clock: Clock,
    contention: Callable[[], float],
    faults: Faults,
    load_duration: float,
    server_seed: int = 0,
) -> AsyncIterator[Event]:
    """Evaluate the prompt (less what the slot's cache holds), then yield tokens as they come."""
    prompt = req.prompt_tokens[-runner.num_ctx :]
    cached = runner.cached_prefix(prompt)
    to_eval = max(len(prompt) - cached, 1)
    started = clock.now()
    prefill = runner.prefill_time(to_eval, contention())
    runner.stall_until = max(runner.stall_until, started) + prefill
    await clock.sleep(prefill)
    prompt_eval_duration = clock.now() - started

    seed = text.seed_for(req.model.name, prompt, req.seed) ^ server_seed
    limited = req.num_predict is not None and req.num_predict >= 0
    target = req.num_predict if limited and req.num_predict is not None else None
    if target is None:
        target = text.natural_length(seed)
    target = min(target, 10 * runner.num_ctx)
    words = text.answer_tokens(seed)
    produced: list[str] = []
    decode_start = due = clock.now()
    runner.decoding += 1
    try:
        while len(produced) < target:
            dies_at = faults.die_after_tokens
            if dies_at is not None and len(produced) >= dies_at:
                raise RunnerFailed(faults.fail_message)
            due = max(due, runner.stall_until) + runner.token_interval(contention())
            delay = due - clock.now()
            if delay > 0:
                await clock.sleep(delay)
            token = next(words)
            produced.append(token)
            yield Token(token)
    finally:
        runner.decoding -= 1
    runner.remember(tuple(prompt) + tuple(produced))
    yield Done(
        done_reason="length" if limited else "stop",
        load_duration=load_duration,
        prompt_eval_count=len(prompt),
        prompt_eval_duration=prompt_eval_duration,
        eval_count=len(produced),
        eval_duration=clock.now() - decode_start,
    )


async def embed_one(
    runner: Runner, tokens: int, *, clock: Clock, contention: Callable[[], float]
) -> None:
    """One embedding input holds a slot for its prompt-evaluation time."""
    await runner.acquire_slot()
    try:
        await clock.sleep(runner.prefill_time(max(tokens, 1), contention()))
    finally:
        runner.release_slot()
