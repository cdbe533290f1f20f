"""What each model family is, in plain Python: the registry ModelConfig checks `arch` against.

placement/ and cost/ size weights, caches and edges from a FamilySpec and never ask which family
they hold; they import no JAX, so this module imports nothing but the standard library. It sits
below the config (configtypes validates `arch` and the family's fields here), so it must not
import jaxpart.config. The JAX side of a family (models/families.Family) carries its spec, and
`families.register` joins both registries. The GQA head split over tensor parallelism lives here
too, once: llama's block, the engine's cache, the shardings and placement/shards all call it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

# ModelConfig fields only some families read; a family that does not read one needs its default.
OPTIONAL_FIELDS = ("n_kv_heads", "vocab", "rope_theta", "rope_scaling", "tie_embeddings",
                   "qkv_bias", "max_positions")


@dataclass(frozen=True)
class HfEntry:
  """One Hugging Face tensor in a family's name map: where it lives in the tree (layer None for
  edge leaves) and whether its two axes are swapped relative to the tree's."""

  hf_name: str
  path: tuple[str, ...]
  layer: int | None
  transpose: bool


@dataclass(frozen=True)
class FamilySpec:
  """A family's shapes as the planner and the cost model need them.

  token_edges: token ids in (a vocab-parallel embedding at stage 0), float32 logits out (a final
    norm and an LM head at the last stage), both held by every stage; else hidden vectors in/out.
  gated_mlp: the MLP has a gate and an up projection (SwiGLU), else one input projection.
  norm_bias: its norms are LayerNorms (scale and bias), else RMSNorms (scale only).
  norms_per_layer: 2 for a pre-LN block, 1 where attention and MLP share one (parallel block).
  allreduces_per_layer: tensor-parallel psums a layer issues (2: after attention and after the
    MLP; 1 where a parallel block sums both before one psum).
  uses: the OPTIONAL_FIELDS this family reads (n_kv_heads: grouped-query attention; rope_theta:
    rotary positions, which need an even head_dim).
  """

  name: str
  display: str
  token_edges: bool
  gated_mlp: bool
  norm_bias: bool
  norms_per_layer: int = 2
  allreduces_per_layer: int = 2
  uses: tuple[str, ...] = ()

  @property
  def mlp_in_projections(self) -> int:
    """D x F matmuls before the MLP's nonlinearity: gate and up for SwiGLU, else w_in."""
    return 2 if self.gated_mlp else 1

  def projection_params_per_layer(self, cfg: Any) -> int:
    """Q and O (D x A), K and V (D x K), the MLP's input projections and its output (D x F)."""
    return (2 * cfg.d_model * cfg.attn_dim + 2 * cfg.d_model * cfg.kv_dim
            + (self.mlp_in_projections + 1) * cfg.d_model * cfg.d_ff)

  def norm_params(self, cfg: Any) -> int:
    """One norm: scale, and bias for a LayerNorm."""
    return (2 if self.norm_bias else 1) * cfg.d_model

  def layernorm_params_per_layer(self, cfg: Any) -> int:
    return self.norms_per_layer * self.norm_params(cfg)

  def head_params(self, cfg: Any) -> int:
    """The final norm and the LM head (D x V unless tied to the embedding); 0 without edges."""
    if not self.token_edges:
      return 0
    return self.norm_params(cfg) + (0 if cfg.tie_embeddings else cfg.d_model * cfg.vocab)

  def config_problem(self, cfg: Any) -> str | None:
    """Why cfg is not a valid config of this family (one line naming field and value), or None.
    Run after the optional fields' types are checked and before the positive-integer checks."""
    defaults = {f.name: f.default for f in fields(cfg)}
    for name in OPTIONAL_FIELDS:
      if name in self.uses or name == "n_kv_heads" or getattr(cfg, name) == defaults[name]:
        continue
      users = [s.name for s in SPECS.values() if name in s.uses]
      who = (f"only arch {users[0]!r} uses it" if len(users) == 1 else
             f"only archs {', '.join(map(repr, users))} use it" if users else "no arch uses it")
      return (f"ModelConfig.{name} = {getattr(cfg, name)!r}: {who}; arch {self.name!r} needs the "
              f"default {defaults[name]!r}")
    if "n_kv_heads" not in self.uses and cfg.n_kv_heads not in (0, cfg.n_heads):
      return (f"ModelConfig.n_kv_heads = {cfg.n_kv_heads}: arch {self.name!r} has no grouped-query "
              f"attention; valid: 0 or n_heads = {cfg.n_heads}")
    if self.token_edges and cfg.vocab <= 0:
      return f"ModelConfig.vocab = {cfg.vocab}: arch {self.name!r} needs a positive vocabulary size"
    sized = isinstance(cfg.n_heads, int) and cfg.n_heads > 0
    if "n_kv_heads" in self.uses and sized and cfg.n_heads % cfg.kv_heads:
      return (f"ModelConfig.n_kv_heads = {cfg.n_kv_heads}: must divide n_heads = {cfg.n_heads} "
              f"(each K/V head serves n_heads / n_kv_heads query heads)")
    if "rope_theta" in self.uses and isinstance(cfg.head_dim, int) and cfg.head_dim % 2:
      return f"ModelConfig.head_dim = {cfg.head_dim}: rotary embedding needs an even head_dim"
    return None


DENSE = FamilySpec(name="dense", display="Dense", token_edges=False, gated_mlp=False,
                   norm_bias=True)
LLAMA = FamilySpec(name="llama", display="Llama", token_edges=True, gated_mlp=True,
                   norm_bias=False, uses=OPTIONAL_FIELDS)

SPECS: dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
  """Join the registry: ModelConfig(arch=spec.name) is accepted from now on."""
  if not isinstance(spec, FamilySpec):
    raise TypeError(f"register takes a FamilySpec, got {type(spec).__name__}")
  unknown = set(spec.uses) - set(OPTIONAL_FIELDS)
  if unknown:
    raise ValueError(f"FamilySpec.uses = {spec.uses!r}: unknown fields {sorted(unknown)}; valid "
                     f"are {', '.join(OPTIONAL_FIELDS)}")
  SPECS[spec.name] = spec
  return spec


def unregister(name: str) -> None:
  """Leave the registry (a test's family, when the test is done)."""
  SPECS.pop(name, None)


def get(name: str) -> FamilySpec | None:
  return SPECS.get(name)


def names() -> tuple[str, ...]:
  return tuple(SPECS)


register(DENSE)
register(LLAMA)


# --- the GQA head split over tensor parallelism (one home) -----------------------------------

def kv_heads_split(cfg: Any, tp: int) -> bool:
  """K/V heads are split over tp when tp divides them; otherwise wk/wv (and bk/bv) are
  replicated over the tensor axis and each shard slices out the heads its queries use."""
  return cfg.kv_heads % tp == 0


def kv_heads_local(cfg: Any, tp: int) -> int:
  """K/V heads one tensor shard computes and caches: kv_heads / tp when tp divides them;
  otherwise the shard's query heads read one replicated head, or one each when they straddle
  K/V groups (llama._local_kv_heads). Without GQA: n_heads / tp."""
  if kv_heads_split(cfg, tp):
    return cfg.kv_heads // tp
  hq, g = cfg.n_heads // tp, cfg.n_heads // cfg.kv_heads
  return 1 if g % hq == 0 else hq
