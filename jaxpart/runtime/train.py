"""The gradient path: one loss for every placement, jax.grad through the engine, AdamW on the mesh.

A loss takes a *forward* (params, x_BxTxD) -> y_BxTxD, so the reference (`model.forward`) and
the engine (`engine.make_forward`) are differentiated by the same code and compared leaf by leaf.
The target is a synthetic regression target: the output of a second, independently initialised
"teacher" stack on the same input, which the student can actually learn in a few steps.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jaxpart.runtime import compat
from jaxpart.runtime import engine
from jaxpart.models import families
from jaxpart.models import dense as model
from jaxpart.runtime import runs
from jaxpart.runtime import sharding
from jaxpart.config import ConfigError, ModelConfig

Forward = Callable[[Any, jax.Array], jax.Array]


# --- loss and gradients ----------------------------------------------------------------------

def mse(y_BxTxD, target_BxTxD):
  """Mean squared error in float32 (float64 under x64 checks), whatever the activation dtype."""
  acc = jnp.promote_types(y_BxTxD.dtype, jnp.float32)
  return jnp.mean(jnp.square(y_BxTxD.astype(acc) - target_BxTxD.astype(acc)))


def engine_forward(plan, cfg: ModelConfig, mesh, **engine_kw) -> Forward:
  """engine.make_forward; engine_kw: remat, bubble_fill, out_fill."""
  return engine.make_forward(plan, cfg, mesh, **engine_kw)


def loss_fn(forward: Forward):
  """(params, x, target) -> (loss, y): y rides along so one call checks forward and backward."""
  def loss(params, x_BxTxD, target_BxTxD):
    y_BxTxD = forward(params, x_BxTxD)
    return mse(y_BxTxD, target_BxTxD), y_BxTxD
  return loss


def value_and_grads(forward: Forward, wrt_input: bool = True):
  """jit of (params, x, target) -> ((loss, y), (d loss/d params, d loss/d x)); with
  wrt_input False (token ids: no gradient) -> ((loss, y), (d loss/d params,)).

  No out_shardings: the gradients of shard_map's inputs come out with its in_specs, i.e. the
  params' shardings, by themselves (tests/test_grad.py checks that they do).
  """
  argnums = (0, 1) if wrt_input else (0,)
  return jax.jit(jax.value_and_grad(loss_fn(forward), argnums=argnums, has_aux=True))


@functools.partial(jax.jit, static_argnums=0)
def _teacher(cfg: ModelConfig, key, inp, dtype_probe):
  fam = families.of(cfg)
  teacher = model.cast_params(fam.init_params(cfg, key), dtype_probe.dtype)
  return fam.reference(teacher, inp, cfg)


def teacher_target(cfg: ModelConfig, inp, key: jax.Array, dtype=None):
  """A learnable regression target: a fresh model's output on inp (computed unsharded), in
  inp's dtype (or `dtype` for token ids)."""
  probe = jnp.zeros((), dtype or (jnp.float32 if families.of(cfg).tokens_in else inp.dtype))
  return _teacher(cfg, key, inp, probe)


def grad_memory(forward: Forward, params_abstract, x_abstract) -> dict[str, int]:
  """Per-device bytes of the compiled grad step (compile only, nothing allocated).

  The abstract arguments are ShapeDtypeStructs carrying the shardings the step will see.
  """
  compiled = value_and_grads(forward).lower(params_abstract, x_abstract, x_abstract).compile()
  return compat.compiled_memory(compiled).to_dict()


def abstract_inputs(cfg: ModelConfig, plan, mesh, dtype):
  """ShapeDtypeStructs of (params placed as the Plan says, the input as the engine takes it)."""
  params = sharding.abstract_placed_params(cfg, plan, mesh, dtype)
  x = jax.ShapeDtypeStruct((plan.batch, plan.seq, cfg.d_model), dtype,
                           sharding=sharding.stream(mesh))
  return params, x


# --- comparing trees leaf by leaf --------------------------------------------------------------

@dataclass(frozen=True)
class LeafCheck:
  """One leaf of a comparison: rel = max|got - want| / max|want|, the figure the checks bound."""

  name: str
  max_abs_diff: float
  max_abs_ref: float
  tol: float
  finite: bool

  @property
  def rel(self) -> float:
    if self.max_abs_ref == 0.0:
      return 0.0 if self.max_abs_diff == 0.0 else float("inf")
    return self.max_abs_diff / self.max_abs_ref

  @property
  def ok(self) -> bool:
    return self.finite and self.rel <= self.tol

  def to_dict(self) -> dict[str, Any]:
    """JSON-safe: a non-finite figure becomes its string ("nan", "inf")."""
    d = dataclasses.asdict(self) | {"rel": self.rel, "ok": self.ok}
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in d.items()}


def leaf_name(path) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def named_leaves(tree) -> dict[str, jax.Array]:
  return {leaf_name(p): a for p, a in jax.tree_util.tree_leaves_with_path(tree)}


def rel_errors(got, want) -> dict[str, float]:
  """max|got - want| / max|want| per leaf, computed in float64 on the host."""
  return {c.name: c.rel for c in compare(got, want, 0.0)}


def compare(got, want, tol: float | dict[str, float]) -> list[LeafCheck]:
  """Leaf-by-leaf check of two trees of the same structure; tol is one bound or one per leaf."""
  g, w = named_leaves(got), named_leaves(want)
  if g.keys() != w.keys():
    raise ValueError(f"trees differ in leaves: {sorted(g.keys() ^ w.keys())}")
  out = []
  for name in w:
    a = np.asarray(runs.fetch(g[name]), np.float64)
    b = np.asarray(runs.fetch(w[name]), np.float64)
    if a.shape != b.shape:
      raise ValueError(f"leaf {name}: shape {a.shape} vs reference {b.shape}")
    out.append(LeafCheck(name=name, max_abs_diff=float(np.abs(a - b).max(initial=0.0)),
                         max_abs_ref=float(np.abs(b).max(initial=0.0)),
                         tol=tol[name] if isinstance(tol, dict) else tol,
                         finite=bool(np.isfinite(a).all())))
  return out


def central_difference_errors(f, primals, key: jax.Array, eps: float = 1e-5) -> dict[str, float]:
  """Autodiff against central differences, per leaf of `primals`, along a random unit direction
  v in that leaf: |(f(p + eps v) - f(p - eps v)) / 2 eps - <g, v>| / rms(g), g the gradient
  restricted to the leaf. For a random unit v, |<g, v>| is rms(g) on average, so the figure reads
  as a relative error of the derivative, and a direction that happens to be nearly orthogonal
  to g cannot inflate it.

  Meant for float64 (under jax.enable_x64): the central difference's own error is then about
  eps^2 (truncation) + 1e-16 / eps (rounding), ~1e-10 at eps = 1e-5.
  """
  value_and_grad = jax.jit(jax.value_and_grad(f))  # one compile serves both uses
  f_jit = lambda p: value_and_grad(p)[0]  # noqa: E731
  grads = named_leaves(value_and_grad(primals)[1])
  flat, treedef = jax.tree_util.tree_flatten_with_path(primals)
  leaves = [leaf for _, leaf in flat]
  out = {}
  for i, (path, leaf) in enumerate(flat):
    v = jax.random.normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype)
    v = v / jnp.linalg.norm(v)

    def at(step, i=i, leaf=leaf, v=v):
      return jax.tree_util.tree_unflatten(treedef, leaves[:i] + [leaf + step * v] + leaves[i + 1:])

    fd = (float(f_jit(at(eps))) - float(f_jit(at(-eps)))) / (2 * eps)
    g = np.asarray(grads[leaf_name(path)], np.float64)
    ad = float(np.vdot(g, np.asarray(v, np.float64)))
    rms = float(np.sqrt(np.mean(np.square(g)))) if g.size else 0.0
    out[leaf_name(path)] = abs(fd - ad) / max(rms, 1e-300)
  return out


def bf16_tolerances(ref_bf16, ref_f32, factor: float = 4.0,
                    floor: float = 2.0 ** -8) -> dict[str, float]:
  """Per-leaf bound for a bf16 result against the float32 reference.

  The yardstick is how far the reference itself moves when run in bf16: rel(ref_bf16, ref_f32)
  per leaf. A placed bf16 run rounds at other points (tensor-parallel partial sums cast to bf16
  before the psum, chunked online softmax, per-stage casts), so its error is of that order but
  not equal: on tiny, both placements, the ratio (placed error / reference error) measured 0.76
  to 2.0 across leaves, and `factor` 4 leaves 2x room over that for fresh random inputs.
  `floor` 2^-8 is one bf16 rounding (half an ulp at 1.0, bf16 keeping 8 significant bits): the
  result is itself stored in bf16, so no bound below that is meaningful.
  """
  return {n: max(factor * r, floor) for n, r in rel_errors(ref_bf16, ref_f32).items()}


# --- optimizer ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup then cosine decay to end_lr (optax.warmup_cosine_decay_schedule)."""

  peak_lr: float = 3e-3
  end_lr: float = 3e-4
  warmup_steps: int = 4
  total_steps: int = 20
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.01

  def __post_init__(self):
    def bad(name, want):
      raise ConfigError(f"OptimConfig.{name} = {getattr(self, name)!r}: must be {want}")

    for name in ("warmup_steps", "total_steps"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        bad(name, "an integer >= 0")
    for name, low in (("peak_lr", 0.0), ("eps", 0.0), ("end_lr", None), ("weight_decay", None)):
      v = getattr(self, name)
      if (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
          or v < 0 or (low is not None and v <= low)):
        bad(name, "a finite number > 0" if low is not None else "a finite number >= 0")
    for name in ("b1", "b2"):
      if not 0.0 <= getattr(self, name) < 1.0:
        bad(name, "in [0, 1)")
    if self.warmup_steps >= self.total_steps:
      bad("warmup_steps", f"less than total_steps = {self.total_steps}")
    if self.end_lr > self.peak_lr:
      bad("end_lr", f"at most peak_lr = {self.peak_lr}")

  def schedule(self) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, self.peak_lr, self.warmup_steps,
                                              self.total_steps, self.end_lr)

  def optimizer(self) -> optax.GradientTransformation:
    return optax.adamw(self.schedule(), b1=self.b1, b2=self.b2, eps=self.eps,
                       weight_decay=self.weight_decay)


def opt_state_shardings(opt: optax.GradientTransformation, params, mesh):
  """Every param-shaped tree in the optimizer state (Adam's mu and nu) takes the params'
  shardings; scalars such as the step count are replicated."""
  state_shapes = jax.eval_shape(opt.init, params)
  return optax.tree_map_params(opt, lambda _, s: s, state_shapes, sharding.param_shardings(mesh),
                               transform_non_params=lambda _: sharding.replicated(mesh))


def make_step(forward: Forward, opt: optax.GradientTransformation, shardings=None):
  """jit of (params, opt_state, x, target) -> (params, opt_state, loss).

  shardings = (param_shardings, state_shardings) pins the outputs where the inputs live, so
  the next step takes them without a copy; None (one device) leaves placement to jit.
  """
  loss = loss_fn(forward)

  def step(params, opt_state, x_BxTxD, target_BxTxD):
    (value, _), grads = jax.value_and_grad(loss, has_aux=True)(params, x_BxTxD, target_BxTxD)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  if shardings is None:
    return jax.jit(step, donate_argnums=(0, 1))
  p_sh, s_sh = shardings
  return jax.jit(step, donate_argnums=(0, 1), out_shardings=(p_sh, s_sh, None))


@dataclass(frozen=True)
class TrainResult:
  params: Any
  opt_state: Any
  losses: tuple[float, ...]


def train(step, params, opt_state, batches: Iterable[tuple[jax.Array, jax.Array]], steps: int,
          desc: str = "train", progress: bool = True) -> TrainResult:
  """Run `steps` steps of `step` over `batches` (cycled), with a progress bar."""
  batches = list(batches)
  losses = []
  for i in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
    x, target = batches[i % len(batches)]
    params, opt_state, value = step(params, opt_state, x, target)
    losses.append(float(value))
  return TrainResult(params=params, opt_state=opt_state, losses=tuple(losses))


def train_on_mesh(plan, cfg: ModelConfig, mesh, params, batches, oc: OptimConfig,
                  progress: bool = True, **engine_kw) -> TrainResult:
  """AdamW through the engine: params and optimizer state sharded as the Plan says."""
  opt = oc.optimizer()
  p_sh = sharding.param_shardings(mesh)
  params = jax.device_put(params, p_sh, may_alias=False)  # steps donate; keep the caller's
  s_sh = opt_state_shardings(opt, params, mesh)
  opt_state = jax.jit(opt.init, out_shardings=s_sh)(params)
  step = make_step(engine_forward(plan, cfg, mesh, **engine_kw), opt, (p_sh, s_sh))
  st = sharding.stream(mesh)
  batches = [(jax.device_put(x, st), jax.device_put(t, st)) for x, t in batches]
  return train(step, params, opt_state, batches, oc.total_steps, f"train {plan.strategy}",
               progress)


def train_reference(cfg: ModelConfig, params, batches, oc: OptimConfig, device=None,
                    progress: bool = True) -> TrainResult:
  """The same steps on one device with the unsharded reference forward."""
  device = device or jax.devices()[0]
  opt = oc.optimizer()
  params = jax.device_put(params, device, may_alias=False)  # steps donate; keep the caller's
  opt_state = jax.jit(opt.init)(params)
  batches = [(jax.device_put(x, device), jax.device_put(t, device)) for x, t in batches]
  return train(make_step(runs.reference_forward(cfg), opt), params, opt_state, batches,
               oc.total_steps, "train reference", progress)
