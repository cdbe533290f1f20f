#!/usr/bin/env python
"""Apply realistic bugs one at a time to a copy of the repository and check the tests catch each.

Each mutation replaces one exact snippet of one file with a plausible wrong version, then runs the
test nodes that should fail (pytest -x -q, PYTHONPATH set to the copy). Killed: those tests
failed. Survived: they passed, i.e. the suite is blind to that bug. A snippet that is no longer
in its file is an ERROR (the code moved: re-target the mutation), never counted as killed.
The working tree is never touched: everything happens in a temporary copy.

  python scripts/mutation_check.py            # all 36: ~4-6 minutes on 2 shared CPU cores
  python scripts/mutation_check.py --baseline # first the 26 test nodes unmutated (+2 minutes)
  python scripts/mutation_check.py --only ln_no_bias --only kv_write_offset
  python scripts/mutation_check.py --list

Each line shows the tests' summary and their first error line: an assertion means the bug was
seen; an exception raised by the mutant itself (a shape error while tracing) is a weaker kill.

When to run it: before merging a change to a test that guards the block's math, the engine and
its streams, blocked attention, the Llama family or its HF name map, decoding, the checkpoint
verifier, the cost or memory model or the planner (a weakened test shows up as SURVIVED); and
after moving or rewriting code a mutation targets (its snippet is then not found: re-target
it, same bug, current code). Not part of .ci/run. Exit status 1 if any mutation
survived or could not be applied.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
  name: str
  file: str
  old: str
  new: str
  tests: tuple[str, ...]
  why: str = ""


E = "tests/test_engine.py::"
ENGINE_LW = E + "test_both_placements_on_16_devices[layerwise-kw0]"   # 4 stages x tp 4, ragged
ENGINE_BASE = E + "test_both_placements_on_16_devices[baseline-kw1]"   # tp 8 x 2 stages
RAGGED = E + "test_ragged_chunks[24]"
ORACLE_REF = "tests/test_oracle.py::test_reference_float64_equals_oracle"
BLOCKED = "tests/test_streams.py::test_blocked_attention_matches_full"
HF_LW = "tests/test_hf_engine.py::test_engine_logits_equal_transformers[llama-gqa-untied-layerwise]"
DENSE_DECODE = "tests/test_generate.py::test_dense_decode_feeds_its_own_output"

# The block's math (model.py), checked against the independent float64 oracle.
MATH = [
    Mutation("ln_var_without_mean", "jaxpart/models/dense.py",
             "var = jnp.square(xa - mean).mean(-1, keepdims=True)",
             "var = jnp.square(xa).mean(-1, keepdims=True)", (ORACLE_REF,),
             "LayerNorm variance as E[x^2], not E[(x - mean)^2]"),
    Mutation("ln_no_bias", "jaxpart/models/dense.py",
             'return (y * p["scale"].astype(acc) + p["bias"].astype(acc)).astype(x_BxTxD.dtype)',
             'return (y * p["scale"].astype(acc)).astype(x_BxTxD.dtype)', (ORACLE_REF,),
             "LayerNorm drops its bias"),
    Mutation("gelu_exact", "jaxpart/models/dense.py", "jax.nn.gelu(_matmul(h_BxTxD, p[\"mlp\"][\"w_in\"]))",
             "jax.nn.gelu(_matmul(h_BxTxD, p[\"mlp\"][\"w_in\"]), approximate=False)", (ORACLE_REF,),
             "the erf GELU where the model is defined with the tanh one"),
    Mutation("accumulate_f32", "jaxpart/models/dense.py",
             "preferred_element_type=attention.acc_dtype(x.dtype))",
             "preferred_element_type=jnp.float32)", (ORACLE_REF,),
             "matmul accumulation forced to float32 (float64 checks become float32)"),
    Mutation("dropped_psum", "jaxpart/models/dense.py",
             "return jax.lax.psum(partial, tp_axis)", "return partial", (ENGINE_BASE,),
             "row-parallel partial sums never all-reduced"),
    Mutation("reference_mask_allows_future", "jaxpart/models/attention.py",
             "mask_QxK = jnp.arange(n_q)[:, None] >= jnp.arange(n_k)[None, :]",
             "mask_QxK = jnp.arange(n_q)[:, None] + 1 >= jnp.arange(n_k)[None, :]",
             (ORACLE_REF,), "the reference lets each token see the next one"),
]

# The pipeline engine (engine.py, families.py): schedule, streams, KV cache.
ENGINE = [
    Mutation("ln1_params_for_ln2", "jaxpart/models/families.py",
             "return model.block_apply(p, x_BxTxD,",
             'return model.block_apply({**p, "ln2": p["ln1"]}, x_BxTxD,', (ENGINE_LW,),
             "the engine's dense block feeds ln1's parameters to ln2"),
    Mutation("remat_dots_saves_everything", "jaxpart/runtime/engine.py",
             "policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable",
             "policy=jax.checkpoint_policies.everything_saveable",
             ("tests/test_grad.py::test_remat_keeps_grads_and_cuts_temp_bytes",),
             "remat 'dots' keeps every intermediate"),
    Mutation("bubble_compute_then_select", "jaxpart/runtime/engine.py",
             "  return jax.lax.cond(valid, run, skip, (x, kc, vc))\n\n\ndef _last_positions",
             "  return jax.tree.map(lambda a, b: jnp.where(valid, a, b), "
             "run((x, kc, vc)), skip((x, kc, vc)))\n\n\ndef _last_positions",
             (E + "test_bubble_ticks_are_skipped_by_cond",),
             "bubble ticks compute the stage step and select the result away"),
    Mutation("reversed_ppermute", "jaxpart/runtime/engine.py",
             "ppermute(y, STAGE_AXIS, [(s, s + 1) for s in range(S - 1)])",
             "ppermute(y, STAGE_AXIS, [(s + 1, s) for s in range(S - 1)])", (ENGINE_LW,),
             "activations sent to the previous stage"),
    Mutation("kv_write_offset", "jaxpart/runtime/engine.py", "at = (l, row0, q_start, 0, 0)",
             "at = (l, row0, q_start + 1, 0, 0)", (RAGGED,), "a chunk's K/V written one position late"),
    Mutation("skipped_ragged_chunk", "jaxpart/runtime/engine.py",
             "valid = (u >= 0) & (u < plan.units)\n",
             "valid = (u >= 0) & (u < plan.units) & (u % plan.n_chunks < plan.n_chunks - 1)\n",
             (RAGGED,), "the last (ragged) chunk's output is never written"),
    Mutation("output_write_row_offset", "jaxpart/runtime/streams.py",
             "(jnp.where(valid, row0, spare), tok0, 0)", "(jnp.where(valid, 0, spare), tok0, 0)",
             (E + "test_microbatches_and_chunks_together",),
             "output stream: every microbatch's slice written at row 0 (its row offset dropped)"),
    Mutation("input_gather_drops_a_slice", "jaxpart/runtime/streams.py",
             "jax.lax.ppermute(piece, STAGE_AXIS, [(k, 0)]) for k in range(1, S)]",
             "jax.lax.ppermute(piece, STAGE_AXIS, [(k - 1, 0)]) for k in range(1, S)]",
             (ENGINE_LW,),
             "input stream: stage 0 gathers blocks from stages 0..S-2, the last stage's is lost"),
]

# Blocked attention (attention.py): the causal mask, the online softmax, query tiles.
ATTENTION = [
    Mutation("causal_mask_strict", "jaxpart/models/attention.py",
             "seen_BxQxK = (q_pos_BxQ[:, :, None] >= k_pos_K[None, None, :])",
             "seen_BxQxK = (q_pos_BxQ[:, :, None] > k_pos_K[None, None, :])", (BLOCKED,),
             "blocked attention masks the diagonal: a token cannot see itself"),
    Mutation("online_softmax_unrescaled", "jaxpart/models/attention.py",
             "acc_new = acc_BxQxGxRxE * jnp.moveaxis(correction, 3, 1)[..., None] + pv",
             "acc_new = acc_BxQxGxRxE + pv", (BLOCKED,),
             "running output not rescaled when the running max grows"),
    Mutation("query_tile_one_block_short", "jaxpart/models/attention.py",
             "jax.lax.cond(j * kv_block <= last_q, visit,",
             "jax.lax.cond((j + 1) * kv_block <= last_q, visit,", (BLOCKED,),
             "a query tile skips the KV block holding its last query"),
]

# The Llama family (llama.py, llama_hf.py) and generation (decode.py).
LLAMA = [
    Mutation("rope_offset_ignored", "jaxpart/runtime/engine.py",
             "pos = (q_start[:, None] if per_row else q_start) + jnp.arange(c)",
             "pos = (q_start[:, None] if per_row else 0) + jnp.arange(c)", (HF_LW,),
             "a chunk's RoPE positions start at 0, not at the chunk's first token"),
    Mutation("dropped_v_bias", "jaxpart/models/llama.py",
             "v_BxTxHxE = _proj(h_BxTxD, wv, bv)", "v_BxTxHxE = _proj(h_BxTxD, wv)",
             ("tests/test_hf.py::test_logits_equal_transformers[qwen2-qkv-bias]",),
             "the v projection's bias (Qwen2) dropped"),
    Mutation("replicated_kv_head_interleaved", "jaxpart/models/llama.py",
             "return (first // g)[None]", "return (first % cfg.kv_heads)[None]",
             ("tests/test_llama_tp.py::test_sharded_layer_embed_and_head_equal_the_unsharded"
              "[bias-tied-tp4-replicated]",),
             "K/V replicated over tp: shard reads K/V head (i mod kv_heads), not its group's"),
    Mutation("hf_import_untransposed_q", "jaxpart/models/llama_hf.py",
             '(("attn", "wq"), "self_attn.q_proj.weight", True)',
             '(("attn", "wq"), "self_attn.q_proj.weight", False)',
             ("tests/test_hf.py::test_logits_equal_transformers[llama-gqa-untied]",),
             "q_proj read as [in, out] (square here, so no shape check sees it)"),
    Mutation("prefill_cache_rows_at_0", "jaxpart/runtime/engine.py",
             "row0=row0 if dev.keep else 0)", "row0=0)",
             ("tests/test_generate.py::test_greedy_tokens_equal_transformers_generate[baseline]",),
             "prefill writes every microbatch's K/V into the whole-batch cache at row 0"),
    Mutation("decode_feedback_wrong_microbatch", "jaxpart/runtime/decode.py",
             "pending.at[m_a].set(fb.astype(pending.dtype))",
             "pending.at[m].set(fb.astype(pending.dtype))", (DENSE_DECODE,),
             "a finished token fed back to the microbatch stage 0 is on, not the one it belongs to"),
    Mutation("decode_kv_write_late", "jaxpart/runtime/engine.py",
             "kc = kc.at[l, rows_R[:, None], pos].set(k)\n"
             "        vc = vc.at[l, rows_R[:, None], pos].set(v)",
             "kc = kc.at[l, rows_R[:, None], pos + 1].set(k)\n"
             "        vc = vc.at[l, rows_R[:, None], pos + 1].set(v)", (DENSE_DECODE,),
             "decode writes each row's K/V one position past its token"),
]

# Checkpoints, the cost model, the memory model, the planner, the run checks.
ACCOUNTING = [
    Mutation("checksum_skips_first_leaf", "jaxpart/checkpoint/digest.py",
             'for p, s in sums.items() if s != entries[p]["checksum"]]',
             'for p, s in list(sums.items())[1:] if s != entries[p]["checksum"]]',
             ("tests/test_checkpoint.py::test_every_leaf_corruption_is_caught",),
             "verification ignores the first leaf"),
    Mutation("transposed_weight_in_conversion", "jaxpart/checkpoint/manifest.py",
             'return [(f"layers/{i}/{path}", arr[i]) for i in range(arr.shape[0])]',
             'return [(f"layers/{i}/{path}", arr[i].T) for i in range(arr.shape[0])]',
             ("tests/test_checkpoint.py::test_npz_layouts_and_foreign_files",),
             "per-layer export writes each weight transposed"),
    Mutation("one_allreduce_per_layer", "jaxpart/models/spec.py",
             "allreduces_per_layer: int = 2", "allreduces_per_layer: int = 1",
             ("tests/test_costmodel.py::test_step_time_equals_a_hand_computed_figure",),
             "cost model charges one Megatron all-reduce per layer, not two"),
    Mutation("visit_sum_off_by_one", "jaxpart/cost/counts.py",
             "(n - 1) * n // 2 + (n - 1) + last // kb + 1", "(n - 1) * n // 2 + last // kb + 1",
             ("tests/test_costmodel.py::test_visit_sum_closed_form_equals_the_tiles",),
             "closed-form tile visits: each full tile counted one KV block short"),
    Mutation("program_bytes_drops_loop_buffer", "jaxpart/placement/memory.py",
             '      "output_loop_buffer": (run.batch + plan.rows) * plan.padded_seq',
             '      "output_loop_buffer": 0 * (run.batch + plan.rows) * plan.padded_seq',
             ("tests/test_paper_memory.py::test_paper_fits_an_h100_and_matches_the_planner[layerwise]",),
             "memory model forgets the output loop buffer (a term of program_bytes)"),
    Mutation("chunk_over_budget", "jaxpart/placement/planner.py",
             "if working_set(cfg, rows, mid, tp, kv_block) <= budget:",
             "if working_set(cfg, rows, mid, tp, kv_block) <= 2 * budget:",
             ("tests/test_planner.py::test_budget_shapes_the_chunk",),
             "the planner picks chunks up to twice the cache budget"),
    Mutation("f32_bound_back_to_1e-5", "jaxpart/runtime/runs.py", "F32_REL_TOL = 2e-6",
             "F32_REL_TOL = 1e-5",
             ("tests/test_run_precision.py::"
              "test_float32_model_checked_with_a_bound_that_sees_an_eps_error",),
             "a float32 bound loose enough to pass LayerNorm eps 1e-6 for 1e-5"),
]

H = "tests/test_costmodel_host.py::"
# The cost model on a host of shared cores and the calibration behind it.
HOST = [
    Mutation("host_transfers_of_busy_devices_only", "jaxpart/cost/forward.py",
             "(work + plan.devices * pipe_work_s) / hw.host_cores",
             "(work + tp * pipe_work_s) / hw.host_cores",
             (H + "test_host_tick_by_hand",),
             "on a host only one stage's devices pay the tick's transfers"),
    Mutation("gemm_spill_rate_swapped", "jaxpart/cost/units.py",
             "n * (hw.gemm_element_s if n * element_bytes <= cache else hw.gemm_spill_element_s)",
             "n * (hw.gemm_spill_element_s if n * element_bytes <= cache else hw.gemm_element_s)",
             (H + "test_gemm_overhead_by_hand",),
             "arrays in the L2 priced at the beyond-L2 rate and the reverse"),
    Mutation("two_unit_writes_a_tick", "jaxpart/cost/counts.py", "TICK_UNIT_WRITES = 3",
             "TICK_UNIT_WRITES = 2",
             (H + "test_unit_sized_writes_per_tick_match_the_count[kw0]",),
             "the per-tick unit copies undercounted"),
    Mutation("link_fit_without_the_core_share", "jaxpart/measure/calibfit.py",
             'return {"link_bw": float(1.0 / (slope * share * link_fraction)),',
             'return {"link_bw": float(1.0 / (slope * link_fraction)),',
             (H + "test_attention_and_link_fits_recover_known_constants",),
             "a device's share of a host's cores left out of the link bandwidth"),
    Mutation("gemm_fit_without_relative_weights", "jaxpart/measure/calibfit.py",
             "a = np.asarray(features, np.float64) / t[:, None]",
             "a = np.asarray(features, np.float64) / t.mean()",
             (H + "test_gemm_fit_recovers_known_constants",
              H + "test_gemm_fit_with_noise_and_a_term_that_is_not_there"),
             "least squares on a wrong right-hand side (times not divided out row by row)"),
]

MUTATIONS = MATH + ENGINE + ATTENTION + LLAMA + ACCOUNTING + HOST
_IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "*.egg-info",
                                 ".ruff_cache")


def _run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
  env = dict(os.environ, PYTHONPATH=str(copy), JAXPART_TEST_SEED=os.environ.get(
      "JAXPART_TEST_SEED", "0"))
  cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
  try:
    p = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return -1, "timed out"
  lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
  summary = lines[-1] if lines else ""
  # The first error line says why the tests failed: an assertion (the bug was seen) reads
  # differently from an exception the mutant raised while tracing.
  errs = [ln[1:].strip() for ln in lines if ln.startswith("E ")]
  why = " ".join(errs[:2]) if errs and errs[0].endswith(":") else (errs or [""])[0]
  return p.returncode, f"{summary}: {why[:110]}" if why else summary


def check(m: Mutation, copy: Path, timeout: float) -> tuple[str, str]:
  path = copy / m.file
  if not path.exists():
    return "ERROR", f"{m.file} not found: re-target this mutation"
  text = path.read_text()
  n = text.count(m.old)
  if n != 1:
    return "ERROR", (f"snippet not found in {m.file}: re-target this mutation" if n == 0 else
                     f"snippet occurs {n} times in {m.file}: make it unique")
  path.write_text(text.replace(m.old, m.new))
  try:
    rc, last = _run_tests(copy, m.tests, timeout)
  finally:
    path.write_text(text)
  if rc == 0:
    return "SURVIVED", last
  if rc in (1,):
    return "killed", last
  return "ERROR", f"pytest exit {rc}: {last}"   # collection error, usage error, timeout


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--only", action="append", default=[], help="run only this mutation (repeat)")
  p.add_argument("--list", action="store_true", help="list the mutations and exit")
  p.add_argument("--baseline", action="store_true",
                 help="first run every listed test unmutated (they must pass)")
  p.add_argument("--timeout", type=float, default=300, help="seconds per mutation")
  args = p.parse_args(argv)
  chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
  unknown = set(args.only) - {m.name for m in MUTATIONS}
  if unknown:
    print(f"error: unknown mutation(s) {sorted(unknown)}", file=sys.stderr)
    return 2
  if args.list:
    for m in chosen:
      print(f"{m.name:32s} {m.file:30s} {m.why}\n{'':32s} caught by {', '.join(m.tests)}")
    return 0
  with tempfile.TemporaryDirectory(prefix="jaxpart-mutants-") as tmp:
    copy = Path(tmp) / "repo"
    shutil.copytree(ROOT, copy, ignore=_IGNORE)
    if args.baseline:
      tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
      rc, last = _run_tests(copy, tests, args.timeout * 4)
      print(f"baseline (unmutated) tests: {'pass' if rc == 0 else 'FAIL'}: {last}")
      if rc != 0:
        return 1
    rows, start = [], time.monotonic()
    for m in chosen:
      t0 = time.monotonic()
      result, detail = check(m, copy, args.timeout)
      rows.append((m, result, time.monotonic() - t0, detail))
      print(f"{result:9s} {m.name:32s} {time.monotonic() - t0:6.1f} s  {detail}", flush=True)
  print()
  print(f"{'mutation':32s} {'file':30s} result")
  for m, result, secs, _ in rows:
    print(f"{m.name:32s} {m.file:30s} {result}")
  counts = {k: sum(r == k for _, r, _, _ in rows) for k in ("killed", "SURVIVED", "ERROR")}
  print(f"\n{counts['killed']} killed, {counts['SURVIVED']} survived, {counts['ERROR']} errors "
        f"of {len(rows)} mutations in {time.monotonic() - start:.0f} s")
  return 0 if counts["killed"] == len(rows) else 1


if __name__ == "__main__":
  sys.exit(main())
