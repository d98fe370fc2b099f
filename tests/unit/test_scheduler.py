"""Scheduler: token budget, chunked prefill, preemption and resumption, stop rules. No torch."""
import pytest

from kvserve.config import SchedulerConfig
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.request import Request, RequestStatus
from kvserve.core.scheduler import Scheduler
from kvserve.sampling_params import SamplingParams

BS = 4
EOS = 2


def make_scheduler(num_blocks=64, budget=64, max_seqs=8, max_len=128, caching=True, short=None) -> Scheduler:
    kv = KVCacheManager(num_blocks, BS, caching)
    return Scheduler(SchedulerConfig(max_seqs, budget, max_len, max_num_batched_tokens_while_decoding=short), kv)


def make_request(req_id, n_prompt, max_tokens=4, start=10, **params) -> Request:
    sp = SamplingParams(max_tokens=max_tokens, **params)
    sp.all_stop_token_ids = set(sp.stop_token_ids) | ({EOS} if not sp.ignore_eos else set())
    return Request(req_id, list(range(start, start + n_prompt)), sp, max_tokens)


def step(sched: Scheduler, token=7):
    """One engine step with a fake model that always samples `token`."""
    out = sched.schedule()
    sampled = {
        rid: [token] for rid, r in sched.requests.items() if rid in out.num_scheduled_tokens and r.num_computed_tokens == r.num_tokens
    }
    return out, sched.update_from_output(out, sampled)


def test_new_requests_get_their_whole_prompt_then_one_token_each_step():
    s = make_scheduler()
    s.add_request(make_request("a", 10))
    s.add_request(make_request("b", 5, start=50))
    out, updates = step(s)
    assert out.num_scheduled_tokens == {"a": 10, "b": 5}
    assert [(n.req_id, n.block_ids) for n in out.scheduled_new_reqs] == [("a", [0, 1, 2]), ("b", [3, 4])]
    assert [(u.req_id, u.new_token_ids) for u in updates] == [("a", [7]), ("b", [7])]
    out, _ = step(s)
    assert out.num_scheduled_tokens == {"a": 1, "b": 1}
    assert out.scheduled_new_reqs == []
    assert [(c.req_id, c.new_block_ids, c.num_computed_tokens) for c in out.scheduled_cached_reqs] == [
        ("a", [], 10),  # the prompt is computed; the sampled token is not yet
        ("b", [], 5),
    ]


def test_long_prompt_is_chunked_while_running_requests_keep_decoding():
    s = make_scheduler(budget=8)
    s.add_request(make_request("short", 3, max_tokens=10))
    step(s)
    s.add_request(make_request("long", 20, start=100))
    chunks, sampled = [], []
    for _ in range(3):
        out, updates = step(s)
        assert out.num_scheduled_tokens["short"] == 1  # decoding never stalls
        chunks.append(out.num_scheduled_tokens["long"])
        sampled.append(sorted(u.req_id for u in updates))
    assert chunks == [7, 7, 6]
    # Partial prefill chunks sample nothing; the last chunk does.
    assert sampled == [["short"], ["short"], ["long", "short"]]
    assert s.requests["long"].output_token_ids == [7]
    out, _ = step(s)
    assert out.num_scheduled_tokens == {"short": 1, "long": 1}


def test_steps_are_short_while_requests_decode():
    s = make_scheduler(budget=32, short=16)
    s.add_request(make_request("d1", 20, max_tokens=50))
    s.add_request(make_request("d2", 4, max_tokens=50, start=40))
    out, _ = step(s)
    assert out.num_scheduled_tokens == {"d1": 20, "d2": 4}  # nobody decodes yet: the full budget
    s.add_request(make_request("p", 24, start=60))
    chunks = []
    while s.requests["p"].num_computed_tokens < 24:
        out, _ = step(s)
        assert out.num_scheduled_tokens["d1"] == out.num_scheduled_tokens["d2"] == 1
        chunks.append(out.num_scheduled_tokens["p"])
    assert chunks == [14, 10]  # 16 tokens a step in all, the two decodes first


def test_prompts_keep_half_the_short_step_when_decodes_fill_it():
    s = make_scheduler(budget=32, short=8, max_seqs=16)
    for i in range(7):
        s.add_request(make_request(f"d{i}", 4, max_tokens=50, start=10 * i))
    step(s)
    s.add_request(make_request("p", 12, start=100))
    out, _ = step(s)
    assert out.num_scheduled_tokens["p"] == 4  # 8 - 7 decodes would leave 1
    assert sum(out.num_scheduled_tokens.values()) == 11


def test_max_num_seqs_limits_running_batch():
    s = make_scheduler(max_seqs=2)
    for i in range(3):
        s.add_request(make_request(f"r{i}", 4, start=10 * i))
    out, _ = step(s)
    assert set(out.num_scheduled_tokens) == {"r0", "r1"}
    assert s.num_waiting == 1


def test_preempts_most_recent_and_resumes_with_prefix_hit():
    # 6 blocks of 4 tokens. a: 8 prompt (2 blocks), b: 8 prompt (2 blocks). Decoding needs more.
    s = make_scheduler(num_blocks=6, max_seqs=4)
    a = make_request("a", 8, max_tokens=12)
    b = make_request("b", 8, max_tokens=12, start=100)
    s.add_request(a)
    s.add_request(b)
    preempted_at = None
    for i in range(30):
        out, _ = step(s)
        if out.preempted_req_ids:
            preempted_at = i
            assert out.preempted_req_ids == {"b"}  # the later admitted one goes
            assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
            assert s.waiting[0] is b
            assert "a" in out.num_scheduled_tokens
            break
    assert preempted_at is not None
    generated_before = list(b.output_token_ids)
    # Keep stepping: a finishes, b comes back from the front of the queue and finishes too.
    resumed = None
    while s.has_unfinished_requests():
        out, _ = step(s)
        for c in out.scheduled_cached_reqs:
            if c.resumed_from_preemption:
                resumed = c
                assert c.req_id == "b"
                assert c.new_block_ids == s.kv.get_block_ids("b")
                assert c.num_computed_tokens > 0  # its prompt blocks were still cached
    assert resumed is not None
    assert a.status == b.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert b.output_token_ids[: len(generated_before)] == generated_before
    assert len(a.output_token_ids) == len(b.output_token_ids) == 12
    assert s.num_preemptions >= 1 and b.num_preemptions >= 1
    assert s.kv.num_blocks_in_use() == 0


def test_requests_that_cannot_ever_fit_are_rejected_at_submission():
    s = make_scheduler(num_blocks=4, max_len=32)
    with pytest.raises(ValueError, match="max_model_len=32"):
        s.add_request(make_request("too-long", 30, max_tokens=3))
    with pytest.raises(ValueError, match="KV cache"):
        s.add_request(make_request("too-big", 12, max_tokens=8))  # 20 tokens > 16 slots
    with pytest.raises(ValueError, match="empty"):
        s.add_request(make_request("empty", 0))
    s.add_request(make_request("fits", 12, max_tokens=4))  # exactly 16
    s.add_request(make_request("fits2", 12, max_tokens=4, start=100))
    while s.has_unfinished_requests():
        step(s)
    assert s.kv.num_blocks_in_use() == 0


def test_stop_conditions():
    s = make_scheduler()
    eos = make_request("eos", 3, max_tokens=10)
    mint = make_request("mint", 3, max_tokens=10, min_tokens=2, start=30)
    stop_id = make_request("stopid", 3, max_tokens=10, stop_token_ids=[9], ignore_eos=True, start=60)
    ign = make_request("ign", 3, max_tokens=3, ignore_eos=True, start=90)
    for r in (eos, mint, stop_id, ign):
        s.add_request(r)
    _, updates = step(s, token=EOS)
    by_id = {u.req_id: u for u in updates}
    assert by_id["eos"].finish_reason == "stop" and by_id["eos"].stop_reason is None
    assert by_id["mint"].finish_reason is None  # EOS ignored below min_tokens
    assert by_id["ign"].finish_reason is None
    _, updates = step(s, token=9)
    by_id = {u.req_id: u for u in updates}
    assert by_id["stopid"].finish_reason == "stop" and by_id["stopid"].stop_reason == 9
    _, updates = step(s, token=EOS)
    by_id = {u.req_id: u for u in updates}
    assert by_id["mint"].finish_reason == "stop" and mint.output_token_ids == [EOS, 9, EOS]
    assert by_id["ign"].finish_reason == "length" and ign.output_token_ids == [EOS, 9, EOS]
    assert not s.has_unfinished_requests()
    out = s.schedule()
    assert out.finished_req_ids == {"mint", "ign"}


def test_abort_frees_blocks_and_is_reported_once():
    s = make_scheduler()
    s.add_request(make_request("a", 10))
    s.add_request(make_request("w", 10, start=40))
    step(s)
    assert s.kv.num_blocks_in_use() == 6
    s.finish_requests(["a", "w", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert s.kv.num_blocks_in_use() == 0
    assert not s.has_unfinished_requests()
    assert s.schedule().finished_req_ids == {"a", "w"}
    assert s.schedule().finished_req_ids == set()
