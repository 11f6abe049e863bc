//! The scheduler alone: no model, no tensors. A tiny driver plays the runner's part (apply the
//! step, sample a made-up token, finish after a given number of tokens).

use super::*;

const BS: usize = 4;

fn attention_spec() -> CacheSpec {
    CacheSpec { attention_layers: 1, kv_dim: 8, recurrent_layers: 0, conv_floats: 0, ssm_floats: 0, context: 4096 }
}

fn hybrid_spec() -> CacheSpec {
    CacheSpec { attention_layers: 1, kv_dim: 8, recurrent_layers: 2, conv_floats: 6, ssm_floats: 16, context: 4096 }
}

fn config(blocks: usize, slots: usize, max_batch_tokens: usize, max_running: usize) -> SchedulerConfig {
    SchedulerConfig {
        memory: MemoryPlan { block_size: BS, blocks, slots, bytes: 0, context: blocks * BS },
        max_batch_tokens,
        max_running,
        recurrent: slots > 0,
    }
}

fn seq(id: SeqId, prompt_len: usize) -> NewSeq {
    NewSeq {
        id,
        tokens: (0..prompt_len as u32).map(|t| t + 100 * id as u32).collect(),
        prompt_logits: false,
        snapshot_at: vec![],
    }
}

/// The runner's part of one step: every sequence whose item reached its end gets a token; those
/// with `limit` generated tokens finish. Returns the finished ids.
fn step(s: &mut Scheduler, limit: &HashMap<SeqId, usize>) -> (SchedulerOutput, Vec<SeqId>) {
    let out = s.schedule();
    check_invariants(s, &out);
    s.complete(&out);
    let mut done = Vec::new();
    for item in &out.items {
        let reached_end = item.start + item.len == s.tokens(item.seq).unwrap().len();
        if item.logits != Logits::None && reached_end {
            let prompt = s.prompt_len(item.seq).unwrap();
            let generated = s.tokens(item.seq).unwrap().len() - prompt + 1;
            if generated >= limit.get(&item.seq).copied().unwrap_or(usize::MAX) {
                done.push(item.seq);
            } else {
                s.append_token(item.seq, 7);
            }
        }
    }
    for &d in &done {
        s.finish(d, true);
    }
    (out, done)
}

fn check_invariants(s: &Scheduler, out: &SchedulerOutput) {
    let c = s.config();
    assert!(out.tokens() <= c.max_batch_tokens, "step budget exceeded: {}", out.tokens());
    assert!(s.running().len() <= c.max_running);
    assert!(s.blocks_used() <= s.blocks_total());
    assert!(s.slots_live() + s.snapshots() <= s.slots_total().max(s.slots_live()));
    let mut slots = std::collections::HashSet::new();
    for item in &out.items {
        assert!(item.len > 0);
        assert!(item.blocks.len() * BS >= item.start + item.len, "block table too short for {item:?}");
        if c.recurrent {
            let slot = item.state_slot.expect("recurrent sequences have a slot");
            assert!(slots.insert(slot), "two sequences share slot {slot}");
            assert!((slot as usize) < s.slots_total());
        }
    }
}

#[test]
fn memory_plan_splits_one_budget() {
    let spec = hybrid_spec();
    let plan = MemoryPlan::new(&spec, 1 << 20, 16, 8).unwrap();
    // 16 slots of (2 · 22 floats) and the rest as blocks of 16 positions × 2 · 8 floats.
    assert_eq!(plan.slots, 16);
    assert_eq!(plan.blocks, ((1 << 20) - 16 * 2 * 22 * 4) / (16 * 2 * 8 * 4));
    assert!(plan.bytes <= 1 << 20);
    assert_eq!(plan.context, 4096.min(plan.blocks * 16));
    // A budget too small for one state is refused, naming why.
    let err = MemoryPlan::new(&spec, 100, 16, 8).unwrap_err();
    assert!(err.reason.contains("recurrent state"), "{err}");
    // Attention only: no slots; the usable context is what the blocks hold, never raised.
    let plan = MemoryPlan::new(&attention_spec(), 64 * 1024, 16, 8).unwrap();
    assert_eq!((plan.slots, plan.blocks), (0, 64));
    assert_eq!(plan.context, 64 * 16);
}

#[test]
fn admission_is_in_arrival_order_and_waits_for_room() {
    let mut s = Scheduler::new(config(8, 0, 64, 8));
    s.add(seq(1, 20)); // 6 blocks with room for its first token
    s.add(seq(2, 12)); // 4 blocks: does not fit beside the first
    s.add(seq(3, 2)); // would fit, but may not overtake the second
    let out = s.schedule();
    assert_eq!(out.admitted, vec![(1, 0)]);
    assert_eq!(s.waiting(), 2);
    assert_eq!(out.items.len(), 1);
    s.complete(&out);
    s.finish(1, false);
    let out = s.schedule();
    assert_eq!(out.admitted.iter().map(|a| a.0).collect::<Vec<_>>(), vec![2, 3]);
}

#[test]
fn decode_tokens_go_first_and_prefill_is_chunked_within_the_budget() {
    let mut s = Scheduler::new(config(64, 0, 8, 8));
    s.add(seq(1, 3));
    let limit = HashMap::from([(1, 100), (2, 100)]);
    let (out, _) = step(&mut s, &limit);
    assert_eq!(out.items[0].len, 3);
    s.add(seq(2, 20));
    let mut chunks = Vec::new();
    for _ in 0..3 {
        let (out, _) = step(&mut s, &limit);
        assert_eq!(out.items[0].seq, 1, "the decoding sequence runs first");
        assert_eq!(out.items[0].len, 1);
        chunks.push(out.items[1].len);
        assert_eq!(out.items[1].logits, if chunks.iter().sum::<usize>() == 20 { Logits::Last } else { Logits::None });
    }
    assert_eq!(chunks, vec![7, 7, 6]);
}

#[test]
fn budget_and_pools_hold_under_a_random_workload_and_everything_is_freed() {
    let mut rng = 12345u64;
    let mut next = move |n: u64| {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (rng >> 33) % n
    };
    for recurrent in [false, true] {
        let mut s = Scheduler::new(config(40, if recurrent { 6 } else { 0 }, 16, 4));
        let mut limit = HashMap::new();
        let mut finished = 0;
        let mut id = 0;
        for _ in 0..2000 {
            if id < 60 && next(3) == 0 {
                id += 1;
                let mut sq = seq(id, 1 + next(40) as usize);
                sq.snapshot_at = vec![next(10) as usize + 1];
                limit.insert(id, 1 + next(20) as usize);
                s.add(sq);
            }
            let (_, done) = step(&mut s, &limit);
            finished += done.len();
            if s.is_idle() && id == 60 {
                break;
            }
        }
        assert_eq!(finished, 60, "every sequence finished (recurrent: {recurrent})");
        assert_eq!(s.slots_live(), 0);
        // Only saved states may still hold blocks; dropping them frees everything.
        while s.evict_snapshot(None) {}
        assert_eq!(s.blocks_used(), 0, "recurrent: {recurrent}");
        assert_eq!(s.free_slots.len(), s.slots_total());
    }
}

#[test]
fn preemption_frees_the_newest_and_it_resumes_later() {
    // 6 blocks of 4: two sequences of 8-token prompts generating 12 tokens each cannot both fit.
    let mut s = Scheduler::new(config(6, 0, 64, 4));
    s.add(seq(1, 8));
    s.add(seq(2, 8));
    let limit = HashMap::from([(1, 12), (2, 12)]);
    let mut preempted = Vec::new();
    let mut finished = Vec::new();
    for _ in 0..200 {
        let (out, done) = step(&mut s, &limit);
        preempted.extend(out.preempted.iter().copied());
        finished.extend(done);
        if s.is_idle() {
            break;
        }
    }
    assert!(preempted.contains(&2), "the newest sequence gave way");
    assert!(!preempted.contains(&1), "the oldest is never preempted by a newer one");
    assert_eq!(finished, vec![1, 2], "both complete, the preempted one after resuming");
    assert_eq!(s.blocks_used(), 0);
}

#[test]
fn a_preempted_sequence_does_not_compute_its_prompt_logits_twice() {
    // As above, but the newer sequence asked for its prompt's logits: they are produced (every
    // prompt row) once; after preemption the recomputed prompt asks for the last row only.
    let mut s = Scheduler::new(config(6, 0, 64, 4));
    s.add(seq(1, 8));
    s.add(NewSeq { prompt_logits: true, ..seq(2, 8) });
    let limit = HashMap::from([(1, 12), (2, 12)]);
    let (mut all_rows, mut was_preempted, mut finished) = (0, false, Vec::new());
    for _ in 0..200 {
        let (out, done) = step(&mut s, &limit);
        for item in out.items.iter().filter(|i| i.seq == 2 && i.logits == Logits::All) {
            assert!(!was_preempted, "prompt logits computed again after preemption: {item:?}");
            all_rows += item.len;
        }
        was_preempted |= out.preempted.contains(&2);
        finished.extend(done);
        if s.is_idle() {
            break;
        }
    }
    assert!(was_preempted, "the test must preempt the sequence");
    assert_eq!(all_rows, 8, "every prompt row's logits, once");
    assert_eq!(finished, vec![1, 2]);
}

#[test]
fn cancellation_frees_every_block_and_slot() {
    let mut s = Scheduler::new(config(32, 4, 64, 4));
    for id in 1..=3 {
        s.add(seq(id, 10));
    }
    let limit = HashMap::new();
    step(&mut s, &limit);
    step(&mut s, &limit);
    assert_eq!(s.slots_live(), 3);
    assert!(s.blocks_used() > 0);
    for id in 1..=3 {
        s.finish(id, false);
    }
    // The prompt-end snapshots saved on the way hold slots and blocks; nothing else does.
    while s.evict_snapshot(None) {}
    assert_eq!((s.slots_live(), s.blocks_used(), s.free_slots.len()), (0, 0, 4));
    assert!(s.is_idle());
}

#[test]
fn a_repeated_prompt_reuses_cached_blocks() {
    let mut s = Scheduler::new(config(32, 0, 64, 4));
    let limit = HashMap::from([(1, 2), (2, 2)]);
    s.add(seq(1, 10));
    while !s.is_idle() {
        step(&mut s, &limit);
    }
    let mut again = seq(2, 10);
    again.tokens = seq(1, 10).tokens;
    s.add(again);
    let out = s.schedule();
    assert_eq!(out.admitted, vec![(2, 8)], "two full blocks of 4 come from the cache");
    assert_eq!(out.items[0].start, 8);
    // Prompt logprobs need every position computed.
    s.finish(2, false);
    let mut scored = seq(3, 10);
    scored.tokens = seq(1, 10).tokens;
    scored.prompt_logits = true;
    s.add(scored);
    let out = s.schedule();
    assert_eq!(out.admitted, vec![(3, 0)]);
    assert_eq!(out.items[0].logits, Logits::All);
}

#[test]
fn recurrent_prefix_resumes_from_a_saved_state_with_its_blocks() {
    let mut s = Scheduler::new(config(32, 4, 64, 4));
    let limit = HashMap::from([(1, 3)]);
    let mut first = seq(1, 10);
    first.snapshot_at = vec![6];
    s.add(first.clone());
    let (out, _) = step(&mut s, &limit);
    assert_eq!(out.items[0].len, 6, "the chunk stops where the state is saved");
    assert_eq!(out.ops, vec![CacheOp::ResetState(out.items[0].state_slot.unwrap())]);
    let live = out.items[0].state_slot.unwrap();
    let (out, _) = step(&mut s, &limit);
    let CacheOp::CopyState { from, to: saved_at_6 } = out.ops[0] else { panic!("{:?}", out.ops) };
    assert_eq!(from, live);
    assert_eq!(s.snapshots(), 1);
    while !s.is_idle() {
        step(&mut s, &limit);
    }
    // Saved: position 6, the prompt end (10) and the sequence's end (12: two generated tokens run).
    assert_eq!(s.snapshots(), 3);
    // A prompt extending the first six tokens resumes at 6: one full block shared, the partial
    // second block copied, the state copied from the position-6 snapshot.
    let mut next = seq(2, 9);
    next.tokens[..6].copy_from_slice(&first.tokens[..6]);
    s.add(next);
    let out = s.schedule();
    assert_eq!(out.admitted, vec![(2, 6)]);
    let slot = out.items[0].state_slot.unwrap();
    assert!(out.ops.contains(&CacheOp::CopyState { from: saved_at_6, to: slot }), "{:?}", out.ops);
    assert!(out.ops.iter().any(|o| matches!(o, CacheOp::CopyBlock { .. })), "{:?}", out.ops);
    assert_eq!(out.items[0].start, 6);
    assert_eq!(out.items[0].len, 3);
}

#[test]
fn saved_states_are_evicted_least_recently_used_when_slots_run_out() {
    // Two slots, shared by the running sequence and saved states.
    let mut s = Scheduler::new(config(64, 2, 64, 1));
    let limit = HashMap::from([(1, 1), (2, 1), (3, 1)]);
    for id in 1..=3 {
        s.add(seq(id, 5));
        while !s.is_idle() {
            step(&mut s, &limit);
        }
        assert_eq!(s.snapshots(), id.min(2) as usize);
    }
    // The first sequence's state went first: a prompt extending it starts from nothing.
    let mut old = seq(4, 6);
    old.tokens[..5].copy_from_slice(&seq(1, 5).tokens);
    s.add(old);
    assert_eq!(s.schedule().admitted, vec![(4, 0)]);
    s.finish(4, false);
    // The newest one is still there.
    let mut again = seq(5, 6);
    again.tokens[..5].copy_from_slice(&seq(3, 5).tokens);
    s.add(again);
    assert_eq!(s.schedule().admitted, vec![(5, 5)]);
}
