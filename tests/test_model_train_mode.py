"""Train-mode semantics (DropPath, dropout) against the upstream's rules (initialisation and
the bfloat16 policy: test_model_init_dtype.py).

Upstream sources the expectations are derived from (rules quoted where they are used):
  ORIG  OpenGVLab/UniFormerV2 slowfast/models/uniformerv2_model.py
  MMA   open-mmlab/mmaction2 mmaction/models/backbones/uniformerv2.py (same DropPath calls,
        schedules and init statements as ORIG)
  timm  timm.models.layers.DropPath (ORIG; MMA uses mmcv's, which is the same rule):
          shape = (x.shape[0],) + (1,) * (x.ndim - 1)
          random_tensor = x.new_empty(shape).bernoulli_(keep_prob); random_tensor.div_(keep_prob)
          return x * random_tensor
        i.e. ONE Bernoulli(keep) per index of the first axis, kept values scaled by 1/keep.

ORIG applies DropPath to sequence-first tensors:
  ResidualAttentionBlock.forward: `x + self.drop_path(self.attention(self.ln_1(x)))` and
    `x + self.drop_path(self.mlp(self.ln_2(x)))` with x of shape (1+HW, NT, C): one draw per
    token position, shared by every clip and frame;
  `tmp_x + self.drop_path(self.lmhra1(tmp_x))` (and lmhra2) with tmp_x of shape (N, C, T, H, W)
    built from x[1:]: one draw per video, the class token untouched;
  Extractor.forward: `x + self.drop_path(...)` with x = cls_token of shape (1, N, C): one draw for
    the whole batch.
Under the upstream's DDP each GPU drew its own masks for its share of the clips
(ModelConfig.replica_batch here: consecutive groups of that many clips; 0 = one group).
Masks are observed here as out = base + mask * branch / keep, every other residual branch of the
block silenced, and compared against the groups that rule defines on the upstream's layout
(mapped to this port's layout with the upstream's own view/permute calls, run in torch).
"""

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import rel_err
from uniformerv2_jax import layers, model_config
from uniformerv2_jax import model as model_lib
from uniformerv2_jax.weights import flatten, model_from_tree, nest, weight_shapes

N, T, RES, PATCH = 4, 2, 32, 8      # 4 videos of 2 frames, a 4x4 token grid
S = 1 + (RES // PATCH) ** 2        # tokens per frame (class token first)
RATE = 0.3                         # keep 0.7: both outcomes frequent, scale 1/0.7 not a round number


def _cfg(**overrides):
  base = dict(input_resolution=RES, patch_size=PATCH, width=16, layers=3, heads=2, n_head=2,
              t_size=T, no_lmhra=False, double_lmhra=True, return_list=(0, 1, 2), num_classes=5,
              mlp_dropout=0.0, cls_dropout=0.0, dtype="float64", param_dtype="float64",
              attention="xla")
  base.update(overrides)
  return model_config(None, **base)


def _model(cfg, zero=(), seed=1):
  """A model of `cfg` with random weights drawn by numpy (no per-shape PRNG compilations), so
  that every residual branch is nonzero (the upstream zero-initialises several); norms' scales
  near 1, running statistics (0, 1). Parameters whose path starts with an entry of `zero` are 0."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, sds in flatten(weight_shapes(cfg.replace(scan_layers=False))).items():
    if path[-1] in ("mean", "var"):
      v = np.full(sds.shape, 0.0 if path[-1] == "mean" else 1.0)
    elif path[-1] == "scale":
      v = 1.0 + 0.1 * rng.standard_normal(sds.shape)
    else:
      v = 0.3 * rng.standard_normal(sds.shape)
    if any(path[:len(z)] == z for z in zero):
      v = np.zeros(sds.shape)
    flat[path] = v
  return model_from_tree(cfg, nest(flat))


# ---------------------------------------------------------------------------------------------
# Upstream DropPath groups, mapped to this port's layouts.


def _groups(upstream_shape):
  """timm's rule on an upstream tensor: the index along axis 0 labels each element's draw."""
  shape = (upstream_shape[0],) + (1,) * (len(upstream_shape) - 1)
  return torch.arange(upstream_shape[0]).reshape(shape).expand(*upstream_shape)


def _token_groups(n, t, s, c, replicas=1):
  """Backbone attention/MLP branches: upstream x is (1+HW, NT, C); this port's is (NT, 1+HW, C).

  Under the upstream's DDP each of `replicas` GPUs ran its own share of the clips (here:
  consecutive groups of `replica_batch` clips, ModelConfig.replica_batch) and drew its own mask."""
  per = n // replicas
  parts = [_groups((s, per * t, c)) + r * s for r in range(replicas)]
  return torch.cat(parts, dim=1).permute(1, 0, 2).numpy()


def _lmhra_groups_upstream(n, t, s, c):
  """Local MHRA branches on the upstream's tmp_x (N, C, T, H, W), brought back to (1+HW, NT, C)
  by ORIG's own `tmp_x.view(N, C, T, L).permute(3, 0, 2, 1).contiguous().view(L, NT, C)` and
  `torch.cat([x[:1, :, :], tmp_x], dim=0)`; -1 marks the class token (not in the branch)."""
  h = w = int(round((s - 1) ** 0.5))
  g = _groups((n, c, t, h, w))
  seq = g.reshape(n, c, t, s - 1).permute(3, 0, 2, 1).contiguous().reshape(s - 1, n * t, c)
  return torch.cat([torch.full((1, n * t, c), -1, dtype=seq.dtype), seq], dim=0)


def _lmhra_groups(n, t, s, c):
  """... in this port's token layout (NT, 1+HW, C)."""
  return _lmhra_groups_upstream(n, t, s, c).permute(1, 0, 2).numpy()


def _lmhra_branch_groups(n, t, s, c):
  """... in the layout of the Local MHRA's own output here, (N, T, HW, C) = (NT, HW, C) split."""
  return _lmhra_groups(n, t, s, c)[:, 1:].reshape(n, t, s - 1, c)


def _global_groups(n, c, replicas=1):
  """Global blocks: upstream cls_token (1, N, C) (per GPU: (1, N / replicas, C)); here (N, 1, C)."""
  per = n // replicas
  parts = [_groups((1, per, c)) + r for r in range(replicas)]
  return torch.cat(parts, dim=1).permute(1, 0, 2).numpy()


def _observed_mask(out, base, branch, keep):
  """out = base + mask * branch / keep: the mask (1 kept, 0 dropped, nan where branch ~ 0).

  Asserts every observable element is either dropped or kept AND scaled by exactly 1/keep."""
  out, base, branch = (np.asarray(a, np.float64) for a in (out, base, branch))
  visible = np.abs(branch) > 1e-4 * np.abs(branch).max()
  ratio = (out - base)[visible] / branch[visible]
  kept = np.abs(ratio - 1.0 / keep) < 1e-8
  dropped = np.abs(ratio) < 1e-8
  assert (kept | dropped).all(), f"values neither dropped nor scaled by 1/keep: {ratio[~(kept | dropped)][:5]}"
  mask = np.full(out.shape, np.nan)
  mask[visible] = kept
  return mask


def _group_outcomes(masks, groups):
  """(draws, groups) outcomes; asserts each group is all kept or all dropped in every draw."""
  labels = np.unique(groups[groups >= 0])
  rows = []
  for m in masks:
    row = []
    for g in labels:
      vals = m[(groups == g) & ~np.isnan(m)]
      assert vals.size, f"group {g} unobservable"
      assert (vals == vals[0]).all(), f"group {g} mixes kept and dropped elements"
      row.append(vals[0])
    rows.append(row)
  return np.array(rows)


def _assert_bernoulli(outcomes, keep):
  """Both outcomes occur and the kept fraction is Binomial(n, keep) within 4.5 sigma."""
  n = outcomes.size
  assert 0 < outcomes.sum() < n
  assert abs(outcomes.mean() - keep) < 4.5 * math.sqrt(keep * (1 - keep) / n), outcomes.mean()


# ---------------------------------------------------------------------------------------------
# 1. DropPath and dropout.


BLOCK0 = ("backbone", "blocks", 0)
# Silencing the other residual branches of block 0 (Local MHRA's last conv, attention's out
# projection, the MLP's c_proj) isolates one branch.
SILENCE = {"lmhra1": ("lmhra2", "out", "mlp_proj"), "attn": ("lmhra1", "lmhra2", "mlp_proj"),
           "lmhra2": ("lmhra1", "out", "mlp_proj"), "mlp": ("lmhra1", "lmhra2", "out")}
PARAMS = {"lmhra1": ("lmhra1", "up"), "lmhra2": ("lmhra2", "up"), "out": ("out",),
          "mlp_proj": ("mlp", "proj")}


@pytest.mark.parametrize("replica_batch", [0, 2])
def test_backbone_drop_path_groups_and_scale_follow_upstream(replica_batch, x64):
  """Block-level: attention/MLP masks per token position (shared by all NT clips x frames and
  channels; with replica_batch, by the clips of one upstream GPU), Local MHRA masks per video
  (class token untouched), 1/keep scaling, independent draws per branch. Fails for timm's
  batch-first per-sample masks, per-element masks, a batch-wide mask, a missing 1/keep or a
  key reused across branches."""
  cfg = _cfg(replica_batch=replica_batch)
  replicas = N // replica_batch if replica_batch else 1
  c, keep = cfg.width, 1.0 - RATE
  x = jnp.asarray(np.random.default_rng(0).standard_normal((N * T, S, c)))
  run = None
  outcomes = {}
  for branch, silenced in SILENCE.items():
    block = _model(cfg, zero=[BLOCK0 + PARAMS[s] for s in silenced]).backbone.blocks[0]
    graphdef, state = nnx.split(block)
    if run is None:  # one compilation for every branch, rate and key
      run = jax.jit(lambda state, x, key, rate: nnx.merge(graphdef, state)(
          x, n=N, key=key, rate=rate, train=True))
    # Rate 0: keep 1, every mask element kept and scaled by 1: base + branch, BatchNorm in
    # train mode (batch statistics) exactly as in the masked runs.
    branch_value = np.asarray(run(state, x, jax.random.key(0), 0.0)) - np.asarray(x)
    assert np.abs(branch_value).max() > 1e-2
    masks = []
    for seed in range(20):
      out = np.asarray(run(state, x, jax.random.key(seed), RATE))
      if branch.startswith("lmhra"):  # ORIG: the class token x[:1] is concatenated back as is
        np.testing.assert_array_equal(out[:, 0], np.asarray(x)[:, 0])
      masks.append(_observed_mask(out, x, branch_value, keep))
    if branch.startswith("lmhra"):  # per video: finer than per GPU, replica_batch changes nothing
      groups = _lmhra_groups(N, T, S, c)
    else:
      groups = _token_groups(N, T, S, c, replicas)
    o = _group_outcomes(masks, groups)
    assert o.shape[1] == (N if branch.startswith("lmhra") else S * replicas)
    # Independent draws across groups: some draw keeps one group and drops another; videos
    # (Local MHRA) and GPU replicas (tokens) each differ from one another in some draw (two
    # independent groups agree in all 20 draws with probability (0.7^2 + 0.3^2)^20 ~ 2e-5).
    assert any(0 < row.sum() < row.size for row in o)
    units = o.reshape(len(o), N, 1) if branch.startswith("lmhra") else o.reshape(len(o), replicas, S)
    for i in range(units.shape[1]):
      for j in range(i):
        assert (units[:, i] != units[:, j]).any(), f"{branch}: groups {i} and {j} share a mask"
    _assert_bernoulli(o, keep)
    outcomes[branch] = o
  # ORIG calls the block's DropPath four times: independent masks for each branch.
  assert not np.array_equal(outcomes["attn"], outcomes["mlp"])
  assert not np.array_equal(outcomes["lmhra1"], outcomes["lmhra2"])


@pytest.mark.parametrize("replica_batch", [0, 2])
def test_global_block_drop_path_is_one_draw_per_batch(replica_batch, x64):
  """Extractor: cls_token is (1, N, C) upstream, so one draw covers every video and channel (of
  one upstream GPU with replica_batch), for the attention branch and for the MLP branch."""
  cfg = _cfg(replica_batch=replica_batch)
  replicas = N // replica_batch if replica_batch else 1
  c, keep = cfg.width, 1.0 - RATE
  rng = np.random.default_rng(1)
  cls = jnp.asarray(rng.standard_normal((N, 1, c)))
  y = jnp.asarray(rng.standard_normal((N, T * S, c)))
  run = None
  dec0 = ("temporal", "dec", 0)
  for silenced in (("mlp", "proj"), ("out",)):  # attention branch, then MLP branch
    graphdef, state = nnx.split(_model(cfg, zero=[dec0 + silenced]).temporal.dec[0])
    if run is None:
      run = jax.jit(lambda state, key, rate: nnx.merge(graphdef, state)(cls, y, key=key, rate=rate))
    branch_value = np.asarray(run(state, jax.random.key(0), 0.0)) - np.asarray(cls)
    assert np.abs(branch_value).max() > 1e-2
    masks = [_observed_mask(run(state, jax.random.key(s), RATE), cls, branch_value, keep)
             for s in range(40)]
    o = _group_outcomes(masks, _global_groups(N, c, replicas))
    assert o.shape == (40, replicas)
    if replicas > 1:
      assert any(0 < row.sum() < row.size for row in o)
    _assert_bernoulli(o, keep)


def _observed_rate(records):
  """The rate behind a list of (x, out) draws of one call site: out is 0 or x / keep."""
  scales = []
  for x, out in records:
    visible = np.abs(x) > 1e-6 * np.abs(x).max()
    r = out[visible] / x[visible]
    kept = r[np.abs(r) > 1e-12]
    if kept.size:
      assert np.ptp(kept) < 1e-9 * kept.max(), "kept values scaled differently"
      scales.append(kept[0])
  assert scales, "never kept anything"
  assert np.ptp(scales) < 1e-9 * max(scales)
  return 1.0 - 1.0 / scales[0]


B_RATE, G_RATE, MLP_DROPOUT, CLS_DROPOUT = 0.3, 0.5, (0.1, 0.3, 0.5), 0.4


@pytest.fixture(scope="module")
def train_calls():
  """Full float64 train forwards (10 keys) of a 4-layer model with Local MHRA and 3 global blocks,
  recording the input and output of every drop_path / dropout call (the real functions, wrapped;
  the records leave the jitted forward as extra outputs)."""
  with jax.enable_x64(True), pytest.MonkeyPatch.context() as mp:
    cfg = _cfg(layers=4, return_list=(1, 2, 3), backbone_drop_path_rate=B_RATE,
               drop_path_rate=G_RATE, mlp_dropout=MLP_DROPOUT, cls_dropout=CLS_DROPOUT)
    model = _model(cfg)
    calls = {"drop_path": [], "dropout": []}
    for name, records in calls.items():
      def spy(x, rate, key, *args, real=getattr(layers, name), records=records):
        out = real(x, rate, key, *args)
        records.append((x, out))
        return out
      mp.setattr(model_lib, name, spy)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x, key):
      for records in calls.values():
        records.clear()
      return nnx.merge(graphdef, state).features(x, train=True, key=key), calls

    x = jnp.asarray(np.random.default_rng(2).standard_normal((N, T, RES, RES, 3)))
    results = [jax.tree.map(np.asarray, run(state, x, jax.random.key(s))) for s in range(10)]
  return cfg, model, results


def test_model_drop_path_schedule_is_torch_linspace(train_calls):
  """Per-layer rates (read off the 1/keep scale of real masks in a full train forward) equal
  ORIG's `b_dpr = [x.item() for x in torch.linspace(0, backbone_drop_path_rate, layers)]` and
  `dpr = [x.item() for x in torch.linspace(0, drop_path_rate, n_layers)]` (Transformer.__init__),
  all four branches of block i using b_dpr[i] (one DropPath module per block), both branches of
  global block j using dpr[j]; rate-0 layers are the identity (ORIG: nn.Identity). Each call's
  mask follows the upstream groups; layers draw independently."""
  cfg, _, results = train_calls
  per_site = collections.defaultdict(list)
  for _, calls in results:
    assert len(calls["drop_path"]) == 4 * cfg.layers + 2 * cfg.n_layers
    for i, rec in enumerate(calls["drop_path"]):
      per_site[i].append(rec)
  b_dpr = [v.item() for v in torch.linspace(0, B_RATE, cfg.layers)]
  dpr = [v.item() for v in torch.linspace(0, G_RATE, cfg.n_layers)]
  # Call order here: each block's lmhra1, attn, lmhra2, mlp; then each global block's attn, mlp.
  expected = [(r, kind) for r in b_dpr for kind in ("video", "token", "video", "token")]
  expected += [(r, "batch") for r in dpr for _ in range(2)]
  c = cfg.width
  group_of = {"token": _token_groups(N, T, S, c), "video": _lmhra_branch_groups(N, T, S, c),
              "batch": _global_groups(N, c)}
  for i, (rate, kind) in enumerate(expected):
    records = per_site[i]
    for xin, _ in records:
      assert xin.shape == group_of[kind].shape, (i, kind, xin.shape)
    if rate == 0.0:
      for xin, out in records:
        np.testing.assert_array_equal(out, xin)
      continue
    observed = _observed_rate(records)
    assert observed == pytest.approx(rate, abs=1e-6), (i, kind)  # torch's float32 linspace
    masks = [_observed_mask(out, np.zeros_like(out), xin, 1.0 - observed) for xin, out in records]
    _group_outcomes(masks, group_of[kind])
  # Layers draw independently (separate keys): block 1 and 2's attention masks differ.
  m1 = [o != 0 for _, o in per_site[4 * 1 + 1]]
  m2 = [o != 0 for _, o in per_site[4 * 2 + 1]]
  assert not all(np.array_equal(a, b) for a, b in zip(m1, m2))


def test_dropout_rates_and_placement(train_calls, monkeypatch, x64):
  """Extractor MLP: c_fc -> QuickGELU -> nn.Dropout(mlp_dropout[j]) -> c_proj (ORIG Extractor),
  elementwise; backbone MLP: no dropout (ORIG ResidualAttentionBlock.mlp has none); head:
  LayerNorm -> nn.Dropout(cls_dropout) -> Linear (ORIG Transformer.proj), elementwise."""
  cfg, model, results = train_calls
  c, hidden = cfg.width, cfg.mlp_width
  per_site = collections.defaultdict(list)
  for feats, calls in results:
    assert len(calls["dropout"]) == cfg.layers + cfg.n_layers + 1
    for i, rec in enumerate(calls["dropout"]):
      per_site[i].append(rec)
    xin, out = calls["dropout"][-1]  # the head: input LayerNorm(pooled), output into the Linear
    np.testing.assert_allclose(xin, np.asarray(model.head.norm(jnp.asarray(feats["pooled"]))),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(feats["logits"], np.asarray(model.head.fc(jnp.asarray(out))),
                               rtol=1e-10, atol=1e-12)
  shapes = [per_site[i][0][0].shape for i in sorted(per_site)]
  assert shapes == [(N * T, S, 4 * c)] * cfg.layers + [(N, 1, hidden)] * cfg.n_layers + [(N, c)]
  for i in range(cfg.layers):
    for xin, out in per_site[i]:
      np.testing.assert_array_equal(out, xin)
  for i, rate in enumerate(MLP_DROPOUT + (CLS_DROPOUT,), start=cfg.layers):
    assert _observed_rate(per_site[i]) == pytest.approx(rate, abs=1e-12)
    for xin, out in per_site[i]:
      kept = (out != 0).reshape(N, -1)
      # nn.Dropout is elementwise: masks vary across features and across videos.
      assert all(0 < row.sum() < row.size for row in kept)
      assert not all(np.array_equal(kept[0], row) for row in kept[1:])
    flat = np.concatenate([(o != 0).ravel() for _, o in per_site[i]]).astype(float)
    _assert_bernoulli(flat, 1.0 - rate)

  # Placement inside the Extractor's MLP: after QuickGELU, before c_proj.
  records = []
  def spy(x, rate, key):
    out = layers.dropout(x, rate, key)
    records.append((x, out))
    return out
  monkeypatch.setattr(model_lib, "dropout", spy)
  mlp = model.temporal.dec[0].mlp
  h = jnp.asarray(np.random.default_rng(4).standard_normal((N, 1, c)))
  y = mlp(h, jax.random.key(7))
  (xin, out), = records
  assert np.any(out == 0) and np.any(out != 0)
  np.testing.assert_allclose(xin, np.asarray(layers.quick_gelu(mlp.fc(h))), rtol=1e-12)
  np.testing.assert_allclose(np.asarray(y), np.asarray(mlp.proj(out)), rtol=1e-12)


def test_scanned_layers_apply_the_same_drop_path(x64):
  """lax.scan over the blocks draws the same masks with the same per-layer rates as the loop
  (the loop is checked against the upstream's rules above); the existing scan test runs with
  every rate at 0, where a scan-only rate/key bug is invisible. In float64: the scan passes the
  rates as float32 and the loop as Python floats, and drop_path draws with a float32 p in both."""
  cfg = _cfg(layers=3, return_list=(1, 2), backbone_drop_path_rate=0.3, drop_path_rate=0.5,
             mlp_dropout=0.3, cls_dropout=0.4)
  x = jnp.asarray(np.random.default_rng(5).standard_normal((N, T, RES, RES, 3)))
  outs = []
  for scan in (False, True):
    graphdef, state = nnx.split(_model(cfg.replace(scan_layers=scan)))
    run = jax.jit(lambda state, key, graphdef=graphdef: nnx.merge(graphdef, state)(
        x, train=True, key=key))
    outs.append([run(state, jax.random.key(k)) for k in (11, 12)])
  (loop11, loop12), (scan11, _) = outs
  assert rel_err(scan11, loop11) < 1e-6  # float32 rates (scan) vs float64 rates (loop)
  # Not vacuous: the masks change the logits.
  assert rel_err(loop12, loop11) > 1e-3
