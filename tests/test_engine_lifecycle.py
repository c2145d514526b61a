"""A request's life in the engine: refusals at add time, aborts and cancelled streams that free
their row, KV cache and adapter pin, adapters read from disk off the step loop, and requests
that wait for a free slot of their kind.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from transformers import Qwen2Config, Qwen2ForCausalLM

from flora_core import MultiAdapterModel, SlotCapacity, UnknownAdapterError, save_adapter
from flora_core.async_engine import AsyncEngine
from flora_core.engine import Engine, EngineConfig
from flora_core.sampling_params import SamplingParams
from tests.engine_fixtures import make_resident, make_setup, one_torch_thread, run_to_completion  # noqa: F401

GREEDY = SamplingParams(max_tokens=6, temperature=0)


@pytest.fixture
def setup():
    return make_setup("llama")


def assert_idle(stats) -> None:
    assert (stats.running, stats.waiting, stats.kv_tokens, stats.pinned_adapters) == (0, 0, 0, 0), stats


# ----- refusals -----


def test_over_limit_prompts_are_refused_and_the_engine_keeps_running(setup):
    engine = setup.engine()
    running = engine.add_request([5, 6, 7], GREEDY, "lora-a")
    engine.step()
    with pytest.raises(ValueError, match="max_model_len of 64; shorten the prompt"):
        engine.add_request(list(range(3, 68)), SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match=r"plus max_tokens \(10\) is 70 tokens.*lower max_tokens to at most 4"):
        engine.add_request(list(range(3, 63)), SamplingParams(max_tokens=10))
    after = engine.add_request([9, 10], GREEDY, "ia3")
    final = run_to_completion(engine)
    engine.close()
    assert list(final[running].token_ids) == setup.reference("lora-a", [5, 6, 7], 6)
    assert list(final[after].token_ids) == setup.reference("ia3", [9, 10], 6)
    assert engine.stats().finished == 2


@pytest.mark.parametrize("prompt, params, adapter, match", [
    ([], GREEDY, None, "prompt is empty"),
    ([5, 128], GREEDY, None, r"prompt token 128 .* \[0, 128\)"),
    ([5, -1], GREEDY, None, "prompt token -1"),
    ([5, 2.0], GREEDY, None, "prompt token 2.0"),
    ("hello", GREEDY, None, "no tokenizer"),
    ([5], SamplingParams(stop=["x"]), None, "stop needs text"),
    ([5], SamplingParams(stop_token_ids=[500]), None, "stop_token_ids has 500"),
    ([5], {"max_tokens": 3}, None, "pass a SamplingParams"),
])
def test_bad_requests_are_refused(setup, prompt, params, adapter, match):
    engine = setup.engine()
    with pytest.raises(ValueError, match=match):
        engine.add_request(prompt, params, adapter)
    assert not engine.has_unfinished()
    engine.close()


def test_unknown_adapter_and_duplicate_ids_are_refused(setup):
    engine = setup.engine()
    with pytest.raises(UnknownAdapterError, match="nope"):
        engine.add_request([5], GREEDY, "nope")
    engine.add_request([5], GREEDY, request_id="r1")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([6], GREEDY, request_id="r1")
    run_to_completion(engine)
    engine.add_request([6], GREEDY, request_id="r1")  # a finished id may be used again
    run_to_completion(engine)
    engine.close()


@pytest.mark.parametrize("kwargs, match", [
    ({"max_model_len": 0}, "max_model_len"),
    ({"max_running": 0}, "max_running"),
    ({"max_model_len": 64, "max_batched_tokens": 32}, "raise max_batched_tokens"),
])
def test_bad_engine_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)


def test_max_model_len_over_the_models_positions(setup):
    with pytest.raises(ValueError, match="lower max_model_len to at most 64"):
        Engine(setup.model, EngineConfig(max_model_len=65))


def test_outputs_carry_usage_and_timings(setup):
    engine = setup.engine()
    rid = engine.add_request([5, 6, 7], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), "ia3")
    outputs = []
    while engine.has_unfinished():
        step_outputs = engine.step()
        outputs += [o for o in step_outputs if o.request_id == rid]
        if not step_outputs:
            engine.wait_for_work(0.01)
    engine.close()
    last = outputs[-1]
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (3, 5, 8)
    assert last.prompt_token_ids == (5, 6, 7) and last.adapter == "ia3" and last.text == ""  # no tokenizer
    assert last.timings.time_to_first_token >= last.timings.queued >= 0
    assert len(last.timings.inter_token_latencies) == 4 and min(last.timings.inter_token_latencies) >= 0
    assert [o.usage.completion_tokens for o in outputs] == [1, 2, 3, 4, 5]
    assert [o.finished for o in outputs] == [False] * 4 + [True] and last.finish_reason == "length"


def test_sliding_window_models_are_refused():
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                         use_sliding_window=True, sliding_window=8, max_window_layers=1)
    model = MultiAdapterModel(Qwen2ForCausalLM(config).eval(), capacity=SlotCapacity(1, 4, 1, 4, 1))
    with pytest.raises(ValueError, match="sliding_attention.*full attention only"):
        Engine(model, EngineConfig(max_model_len=64))


# ----- aborts and cancellation -----


def test_abort_frees_rows_cache_and_pins(setup):
    make_resident(setup, ["lora-a", "flora"])
    engine = setup.engine()
    params = SamplingParams(max_tokens=12, temperature=0)
    ids = [engine.add_request([5, 6, 7], params, adapter) for adapter in ("lora-a", "flora", None, "lora-a")]
    queued = engine.add_request([8, 9], params, "ia3")
    assert engine.abort(queued)  # still in the inbox: never admitted
    engine.step(), engine.step()
    stats = engine.stats()
    assert (stats.running, stats.kv_tokens, stats.pinned_adapters) == (4, 4 * 4, 2)
    assert engine.abort(ids[0]) and engine.abort(ids[1])
    outputs = {o.request_id: o for o in engine.step()}
    assert outputs[ids[0]].finish_reason == outputs[ids[1]].finish_reason == "abort"
    stats = engine.stats()
    assert (stats.running, stats.kv_tokens, stats.pinned_adapters) == (2, 2 * 5, 1)
    final = run_to_completion(engine)
    engine.close()
    assert list(final[ids[2]].token_ids) == setup.reference(None, [5, 6, 7], 12)  # the rest is unaffected
    assert list(final[ids[3]].token_ids) == setup.reference("lora-a", [5, 6, 7], 12)
    assert not engine.abort(ids[2])  # finished: nothing to abort
    assert_idle(engine.stats())
    assert (engine.stats().aborted, engine.stats().finished) == (3, 2)
    assert setup.model.pool.stats().pinned == 0


def test_closing_a_busy_engine_aborts_its_requests_and_frees_every_slot(setup):
    make_resident(setup, ["lora-a", "lora-b", "flora"])
    engine = setup.engine()
    params = SamplingParams(max_tokens=12, temperature=0)
    running = [engine.add_request([5, 6, 7], params, adapter) for adapter in ("lora-a", "lora-b", "flora")]
    engine.step(), engine.step()
    queued = engine.add_request([8, 9], params, "ia3")  # in the inbox, never admitted
    assert engine.stats().pinned_adapters == 3
    outputs = {o.request_id: o for o in engine.close()}
    assert sorted(outputs) == sorted(running + [queued])
    assert {o.finish_reason for o in outputs.values()} == {"abort"}
    assert_idle(engine.stats())
    assert engine.stats().aborted == 4 and not engine.has_unfinished()
    # A new engine on the same model finds both LoRA slots free: two LoRA adapters run side by side.
    after = setup.engine()
    ids = {adapter: after.add_request([5, 6, 7], params, adapter) for adapter in ("lora-b", "lora-a", "ia3")}
    final = run_to_completion(after)
    after.close()
    for adapter, rid in ids.items():
        assert list(final[rid].token_ids) == setup.reference(adapter, [5, 6, 7], 12)
    assert setup.model.pool.stats().pinned == 0


class GatedSteps:
    """Lets the engine loop thread run only as many steps as the test releases."""

    def __init__(self, engine: Engine) -> None:
        self._step = engine.step
        self.permits = threading.Semaphore(0)
        engine.step = self

    def __call__(self):
        return self._step() if self.permits.acquire(timeout=0.01) else []


async def wait_until(condition, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("how", ["cancel", "aclose", "break", "abort"])
def test_a_cancelled_stream_aborts_its_request(setup, how):
    """cancel: the consumer's task is cancelled while it waits for the next output; aclose: the
    consumer closes the stream; break: it leaves its async-for and drops the stream; abort: the
    server calls abort(request_id) and the stream ends with finish_reason "abort"."""
    make_resident(setup, ["flora", "lora-a"])
    engine = setup.engine()
    gate = GatedSteps(engine)
    params = SamplingParams(max_tokens=30, temperature=0)
    aborted = []  # request ids the streams asked the engine to abort
    engine_abort = engine.abort
    engine.abort = lambda request_id: aborted.append(request_id) or engine_abort(request_id)

    async def main():
        async with AsyncEngine(engine) as served:
            other = asyncio.ensure_future(_collect(served.generate([3, 4], params, "flora")))
            received = []

            async def consume():
                stream = served.generate([5, 6, 7], params, "lora-a", request_id="target")
                if how == "aclose":
                    received.extend([await stream.__anext__(), await stream.__anext__()])
                    await stream.aclose()
                    return
                async for output in stream:
                    received.append(output)
                    if how == "break" and len(received) == 2:
                        break

            task = asyncio.ensure_future(consume())
            await wait_until(lambda: engine.stats().waiting == 2)
            gate.permits.release(2)  # prefill both, then one decode step
            await wait_until(lambda: len(received) == 2)
            stats = engine.stats()
            assert (stats.running, stats.pinned_adapters, stats.kv_tokens) == (2, 2, 2 * 4)
            if how == "abort":
                assert served.abort("target")
                gate.permits.release()
                await task
            else:
                if how == "cancel":
                    task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                # A dropped stream ("break") is closed by the event loop's async-generator finalizer, a task
                # scheduled when the stream is collected: the abort may come a loop turn after the consumer ends.
                await wait_until(lambda: aborted == ["target"])
                gate.permits.release()
            await wait_until(lambda: engine.stats().aborted == 1)
            stats = engine.stats()
            # the other row alone, its left padding trimmed: prompt 2 + 2 tokens fed back
            assert (stats.running, stats.pinned_adapters, stats.kv_tokens) == (1, 1, 4)
            gate.permits.release(40)
            return await other, received

    outputs, received = asyncio.run(main())
    if how == "abort":
        assert [o.finish_reason for o in received] == [None, None, "abort"]
    assert list(outputs[-1].token_ids) == setup.reference("flora", [3, 4], 30)
    assert_idle(engine.stats())
    assert (engine.stats().aborted, engine.stats().finished) == (1, 1)


async def _collect(stream):
    return [output async for output in stream]


def test_a_failing_request_raises_from_its_stream_and_others_go_on(setup, tmp_path):
    (tmp_path / "broken").mkdir()
    setup.model.add_adapter("broken", tmp_path / "broken")

    async def main():
        async with AsyncEngine(setup.engine()) as served:
            with pytest.raises(ValueError, match="max_model_len"):
                await _collect(served.generate(list(range(3, 70)), GREEDY))
            with pytest.raises(Exception, match="broken"):
                await _collect(served.generate([5, 6], GREEDY, "broken"))
            good = await _collect(served.generate([5, 6], GREEDY, "ia3"))
            assert served.is_running()
            return good, served.stats(), served

    good, stats, served = asyncio.run(main())
    assert not served.is_running()
    assert list(good[-1].token_ids) == setup.reference("ia3", [5, 6], 6)
    assert (stats.failed, stats.finished) == (1, 1)


def test_a_failed_step_fails_the_requests_in_flight_and_the_engine_goes_on(setup):
    forward_calls = []

    def fail_third_forward(_module, _args):
        forward_calls.append(1)
        if len(forward_calls) == 3:
            raise RuntimeError("the device fell over")

    handle = setup.model.model.register_forward_pre_hook(fail_third_forward)

    async def main():
        async with AsyncEngine(setup.engine()) as served:
            failed = await asyncio.gather(_collect(served.generate([5, 6], GREEDY, "lora-a")),
                                          _collect(served.generate([7], GREEDY, "flora")), return_exceptions=True)
            handle.remove()
            good = await _collect(served.generate([5, 6], GREEDY, "lora-a"))
            return failed, good, served.stats()

    failed, good, stats = asyncio.run(main())
    assert [str(error) for error in failed] == ["the device fell over"] * 2
    assert list(good[-1].token_ids) == setup.reference("lora-a", [5, 6], 6)
    assert (stats.failed, stats.finished) == (2, 1)
    assert_idle(stats)


def fail_forward_number(setup, n: int):
    """A hook that raises on the model's n-th forward pass from now; remove() it after."""
    calls = []

    def hook(_module, _args):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("the device fell over")

    return setup.model.model.register_forward_pre_hook(hook)


def step_as_the_async_engine_does(engine: Engine) -> list:
    try:
        return engine.step()
    except RuntimeError as error:
        return engine.fail_all(error)


@pytest.mark.parametrize("how", ["finished", "aborted"])
def test_a_request_that_ended_earlier_in_a_failed_step_keeps_its_last_output(setup, how):
    """A ends in a step (its last token by its decode, or its abort) whose later prefill of B raises: A's
    last output still comes out (its stream would wait for ever), and its id is free again."""
    make_resident(setup, ["lora-a", "lora-b"])
    engine = setup.engine()
    a = engine.add_request([5, 6], SamplingParams(max_tokens=2 if how == "finished" else 8, temperature=0,
                                                  ignore_eos=True), "lora-a", request_id="A")
    first = step_as_the_async_engine_does(engine)  # A's prefill and first token
    assert [(o.request_id, o.finished) for o in first] == [(a, False)]
    if how == "aborted":
        engine.abort(a)
    engine.add_request([7, 8], GREEDY, "lora-b", request_id="B")
    handle = fail_forward_number(setup, 2 if how == "finished" else 1)  # the pass after A's own: B's prefill
    try:
        outputs = step_as_the_async_engine_does(engine)
    finally:
        handle.remove()
    assert [(o.request_id, o.finish_reason) for o in outputs] == [
        ("A", "length" if how == "finished" else "abort"), ("B", "error")]
    if how == "finished":
        assert list(outputs[0].token_ids) == setup.reference("lora-a", [5, 6], 2)
    assert not engine.has_unfinished()
    stats = engine.stats()
    assert (stats.finished, stats.aborted, stats.failed) == ((1, 0, 1) if how == "finished" else (0, 1, 1))
    assert_idle(stats)
    engine.add_request([5, 6], GREEDY, "lora-a", request_id="A")  # the id is free again
    assert list(run_to_completion(engine)["A"].token_ids) == setup.reference("lora-a", [5, 6], 6)


def test_an_abort_that_comes_as_its_request_finishes_spares_the_ids_next_request(setup):
    """abort(A) lands while the step that finishes A runs: A has ended, and a new request reusing the id A
    must run, not be aborted by the stale abort."""
    make_resident(setup, ["lora-a"])
    engine = setup.engine()
    engine.add_request([5, 6], SamplingParams(max_tokens=1, temperature=0), "lora-a", request_id="A")
    aborted = []
    handle = setup.model.model.register_forward_pre_hook(lambda _m, _a: aborted.append(engine.abort("A")))
    try:
        assert [(o.request_id, o.finish_reason) for o in engine.step()] == [("A", "length")]
    finally:
        handle.remove()
    assert aborted == [True]  # taken: A was still unfinished when it came
    engine.add_request([5, 6], GREEDY, "lora-a", request_id="A")
    assert list(run_to_completion(engine)["A"].token_ids) == setup.reference("lora-a", [5, 6], 6)


# ----- adapters from disk, and full pools -----


def test_adapter_read_from_disk_does_not_stall_the_running_batch(setup, tmp_path):
    save_adapter(setup.adapters["lora-b"], tmp_path / "disk-lora")
    setup.model.add_adapter("disk-lora", tmp_path / "disk-lora")
    setup.adapters["disk-lora"] = setup.adapters["lora-b"]
    pool = setup.model.pool
    release_read = threading.Event()
    read = pool.prefetch_to_host
    pool.prefetch_to_host = lambda name: (name != "disk-lora" or release_read.wait(timeout=20)) and read(name)
    engine = setup.engine()
    running = engine.add_request([5, 6, 7], SamplingParams(max_tokens=20, temperature=0), "flora")
    while engine.stats().running == 0:  # flora's (in-memory) read, then its admission
        engine.step() or engine.wait_for_work(0.01)
    waiting = engine.add_request([8, 9], GREEDY, "disk-lora")
    for _ in range(4):  # the read is held: the running request decodes on, the new one waits
        assert [o.request_id for o in engine.step()] == [running]
        stats = engine.stats()
        assert (stats.running, stats.waiting, stats.loading_adapters) == (1, 1, 1)
    release_read.set()
    engine.wait_for_work(timeout=20)
    final = run_to_completion(engine)
    again = engine.add_request([10], GREEDY, "disk-lora")  # resident now: no second read
    final.update(run_to_completion(engine))
    engine.close()
    assert list(final[running].token_ids) == setup.reference("flora", [5, 6, 7], 20)
    assert list(final[waiting].token_ids) == setup.reference("disk-lora", [8, 9], 6)
    assert list(final[again].token_ids) == setup.reference("disk-lora", [10], 6)
    assert pool.stats().disk_reads == 1
    assert_idle(engine.stats())


def test_a_full_kind_waits_for_a_retirement():
    setup = make_setup("llama", capacity=SlotCapacity(lora_slots=1, lora_max_rank=4, flora_slots=1,
                                                       flora_max_rank=4, ia3_slots=1))
    engine = setup.engine()
    requests = {engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0), adapter): (adapter, prompt, n)
                for adapter, prompt, n in [("lora-a", [5, 6], 5), ("lora-b", [7, 8], 4), (None, [9], 3)]}
    first, second, _ = requests
    order, final = [], {}
    while engine.has_unfinished():
        outputs = engine.step()
        order += [o.request_id for o in outputs if o.request_id in (first, second)]
        final.update({o.request_id: o for o in outputs if o.finished})
        if not outputs:
            engine.wait_for_work(0.01)
    engine.close()
    assert order == [first] * 5 + [second] * 4  # lora-b is admitted once lora-a's request has retired
    for rid, (adapter, prompt, n) in requests.items():
        assert list(final[rid].token_ids) == setup.reference(adapter, prompt, n)
    assert setup.model.pool.stats().evictions == 1  # lora-a, after its release
    assert_idle(engine.stats())
