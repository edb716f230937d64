"""DSPA's offline conditional-difference map (METHOD.md, "DSPA — offline map").

For each triple, forward-only with the base model: the prompt density `g(x)` of input-SAE latents
(read from the chosen pass, since l_in < l_out), and the response densities `rho(x, y±)` of
output-SAE latents; `delta = rho(x,y+) - rho(x,y-)`; `A = (1/N) sum_n g_n delta_n^T`.

The map stores *sums* and the count, so shards (or more data later) merge exactly. The sum is
accumulated block-sparsely (only rows active in some prompt of a batch times columns with a
non-zero delta), so no dense m_in x m_out matrix is ever built per triple, and it is stored as a
sparse COO tensor. Sparsification by the threshold `tau` happens when the map is used.

What a map belongs to and the steering settings chosen for it are a typed `MapMetadata` (its config.json),
so a misspelt or unknown key is refused with the file named instead of silently falling back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from tqdm.auto import tqdm

from saealign import __version__
from saealign._io import atomic_dir, load_tensors, read_json, save_tensors, write_json
from saealign.activations import DEFAULT_SINK_FACTOR, keep_mask
from saealign.cost import CostMeter, combine, measured
from saealign.config import ConfigError, check_config, differing_settings
from saealign.hooks import read_residuals
from saealign.models import model_fingerprint, model_id, model_mismatch
from saealign.sae.core import SAE
from saealign.steering import LatentSteering, SteeringOptions

log = logging.getLogger(__name__)

MAP_TENSORS = "dspa_map.safetensors"
CONFIG = "config.json"
FORMAT_VERSION = 2  # 1 (or none): recommended settings under loose keys `recommended`, `recommended_static`, ...


@dataclass
class SparseSum:
    """A running sum of outer products `g delta^T`: a coalesced sparse COO tensor while that is
    smaller, one dense float64 accumulator once more than half of the cells are filled (COO costs
    24 bytes an entry while coalescing, dense 8 a cell)."""

    m_in: int
    m_out: int
    indices: torch.Tensor = field(default_factory=lambda: torch.zeros(2, 0, dtype=torch.long))
    values: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    _pending: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)
    _dense: torch.Tensor | None = field(default=None, repr=False)

    def add_outer(self, g: torch.Tensor, delta: torch.Tensor) -> None:
        """Add sum_b g[b] delta[b]^T, computed only on the active rows/columns of this batch."""
        rows = g.abs().sum(0).nonzero().squeeze(1)
        cols = delta.abs().sum(0).nonzero().squeeze(1)
        if rows.numel() == 0 or cols.numel() == 0:
            return
        block = g[:, rows].double().T @ delta[:, cols].double()  # (rows, cols)
        if self._dense is not None:
            self._dense[rows.unsqueeze(1), cols.unsqueeze(0)] += block
            return
        nz = block.nonzero(as_tuple=True)
        self._pending.append((torch.stack([rows[nz[0]], cols[nz[1]]]), block[nz]))
        if sum(p[1].numel() for p in self._pending) >= max(self.values.numel(), 1 << 20):
            self.coalesce()

    def coalesce(self) -> "SparseSum":
        if self._pending:
            idx = torch.cat([self.indices] + [p[0] for p in self._pending], 1)
            val = torch.cat([self.values] + [p[1] for p in self._pending])
            self._pending.clear()
            t = torch.sparse_coo_tensor(idx, val, (self.m_in, self.m_out), check_invariants=True).coalesce()
            self.indices, self.values = t.indices(), t.values()
            if 2 * self.values.numel() > self.m_in * self.m_out:
                self._dense = t.to_dense()
                self.indices, self.values = self.indices[:, :0], self.values[:0]
        return self

    @property
    def nnz(self) -> int:
        self.coalesce()
        return int(self._dense.count_nonzero()) if self._dense is not None else self.values.numel()

    @property
    def is_dense(self) -> bool:
        return self.coalesce()._dense is not None

    def __iadd__(self, other: "SparseSum") -> "SparseSum":
        other.coalesce()
        if other._dense is not None or self.coalesce()._dense is not None:
            self._dense = self.dense() + other.dense()
            self.indices, self.values = self.indices[:, :0], self.values[:0]
            return self
        self._pending.append((other.indices, other.values))
        return self.coalesce()

    def dense(self) -> torch.Tensor:
        """The sum as a new dense (m_in, m_out) float64 tensor."""
        self.coalesce()
        if self._dense is not None:
            return self._dense.clone()
        return torch.sparse_coo_tensor(self.indices, self.values, (self.m_in, self.m_out),
                                       check_invariants=True).to_dense()


@dataclass
class DSPAMap:
    """Sums and count of the conditional-difference map, plus what it belongs to."""

    a_sum: SparseSum
    g_sum: torch.Tensor  # (m_in,) sum of prompt statistics (for the static-sae baseline)
    count: int
    meta: MapMetadata
    # (d_model,) sum of per-triple mean differences of h^{l_out} over chosen vs rejected response
    # tokens: the RepE/CAA vector at l_out, free from the same passes (None for maps without it)
    repe_sum: torch.Tensor | None = None
    # (m_out,) sum of delta: what centring needs (None for maps fitted before it was recorded)
    delta_sum: torch.Tensor | None = None

    # -- the map ----------------------------------------------------------------------------------
    def matrix(self, threshold: float | None = None, center: bool = False) -> torch.Tensor:
        """`A = sums / N`, entries with |A| < threshold set to zero; dense (m_in, m_out) float32. The threshold
        defaults to the map's tau: DSPA's recommended one, else the fit's (`dspa fit --threshold`).

        `center`: `A - mean(g) mean(delta)^T`, the covariance of prompt statistic and response difference.
        The part removed is one output direction (the mean delta) weighted by how much a prompt looks like the
        average prompt, the same for every prompt: what static steering already does. What remains is what the
        prompt adds, so DSPA's edits differ from prompt to prompt (`eval map-signal`: edited_overlap_static)."""
        if self.count == 0:
            raise ValueError("empty DSPA map (no triples)")
        tau = next(t for t in (threshold, self.meta.recommended.dspa.threshold, self.meta.threshold) if t is not None)
        a = self.a_sum.dense() / self.count
        if center:
            if self.delta_sum is None:
                raise ValueError("this DSPA map records no delta sums (fitted by an older saealign): refit it to center")
            a = a - torch.outer(self.g_sum.double(), self.delta_sum.double()) / self.count ** 2
        a = a.float()
        if tau > 0:
            a[a.abs() < tau] = 0.0
        return a

    def mean_g(self) -> torch.Tensor:
        return (self.g_sum / max(1, self.count)).float()

    def static_scores(self, threshold: float | None = None) -> torch.Tensor:
        """`A^T mean(g)`: static-sae's scores, the same for every prompt (the paper's A: centring removes them)."""
        return self.mean_g() @ self.matrix(threshold)

    def repe_vector(self) -> torch.Tensor:
        """The mean-difference (RepE/CAA) vector at l_out from the fitting passes."""
        if self.repe_sum is None:
            raise ValueError("this DSPA map carries no RepE sums (fitted by an older saealign); use `dspa repe`")
        return (self.repe_sum / max(1, self.count)).float()

    # -- identity checks ---------------------------------------------------------------------------
    def check_compatible(self, model=None, sae_in: SAE | None = None, sae_out: SAE | None = None) -> None:
        """Refuse a model or SAEs other than the ones the map was fitted with, saying which part differs."""
        problems = []
        if model is not None:
            mismatch = model_mismatch(model, self.meta.model, self.meta.model_fingerprint)
            if mismatch:
                problems.append(f"model: map was fitted on {mismatch}")
        for name, sae in (("sae_in", sae_in), ("sae_out", sae_out)):
            if sae is None:
                continue
            want = getattr(self.meta, name)
            if sae.fingerprint() != want["fingerprint"]:
                problems.append(f"{name}: map was fitted with SAE {want['fingerprint']} ({want['hook_name']}), "
                                f"got {sae.fingerprint()} ({sae.hook_name})")
        if problems:
            raise ValueError("DSPA map does not match: " + "; ".join(problems))

    # -- persistence ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if self.a_sum.is_dense:  # stored as accumulated: whichever of COO and dense is smaller
            tensors = {"a_sum_dense": self.a_sum.dense()}
        else:
            tensors = {"a_sum_indices": self.a_sum.indices.int(), "a_sum_values": self.a_sum.values}
        if self.repe_sum is not None:
            tensors["repe_sum"] = self.repe_sum.double()
        if self.delta_sum is not None:
            tensors["delta_sum"] = self.delta_sum.double()
        manifest = save_tensors(path / MAP_TENSORS, {**tensors, "g_sum": self.g_sum.double()})
        write_json(path / CONFIG, {**self.meta.to_json(), "count": self.count, "nnz": self.a_sum.nnz, "tensors": manifest})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "DSPAMap":
        """Load a saved map, refusing corrupt files: checksums and shapes recorded in the config (maps
        saved before checksums are checked for finite values and shapes only)."""
        path = Path(path)
        config = read_json(path / CONFIG)
        meta = MapMetadata.from_json(config, path / CONFIG)
        tensors = load_tensors(path / MAP_TENSORS, config.get("tensors"))
        _check_shapes(tensors, meta, path)
        if "a_sum_dense" in tensors:
            a_sum = SparseSum(meta.m_in, meta.m_out, _dense=tensors["a_sum_dense"])
        else:
            a_sum = SparseSum(meta.m_in, meta.m_out, tensors["a_sum_indices"].long(), tensors["a_sum_values"])
        return cls(a_sum, tensors["g_sum"], config["count"], meta, tensors.get("repe_sum"), tensors.get("delta_sum"))


def _check_shapes(tensors: dict[str, torch.Tensor], meta: MapMetadata, path: Path) -> None:
    """The tensors must have the sizes the config states (an edited or mismatched config is refused)."""
    m_in, m_out = meta.m_in, meta.m_out
    for name, size in (("m_in", m_in), ("m_out", m_out)):
        recorded = (meta.sae_in if name == "m_in" else meta.sae_out).get("d_sae", size)
        if size != recorded:
            raise ValueError(f"{path / CONFIG}: {name}={size}, but its SAE has d_sae={recorded}")
    want = {"g_sum": (m_in,), "a_sum_dense": (m_in, m_out), "repe_sum": (meta.d_model,), "delta_sum": (m_out,)}
    for name, shape in want.items():
        got = tuple(tensors[name].shape) if name in tensors else shape
        if None not in shape and got != shape:
            raise ValueError(f"{path / MAP_TENSORS}: tensor {name!r} has shape {got}, but {CONFIG} says {shape} "
                             f"(m_in={m_in}, m_out={m_out}, d_model={meta.d_model})")
    if "a_sum_dense" not in tensors:
        idx, values = tensors.get("a_sum_indices"), tensors.get("a_sum_values")
        if idx is None or values is None:
            raise ValueError(f"{path / MAP_TENSORS}: holds neither a_sum_dense nor a_sum_indices/a_sum_values")
        if idx.dim() != 2 or idx.shape[0] != 2 or idx.shape[1] != values.numel() or values.dim() != 1:
            raise ValueError(f"{path / MAP_TENSORS}: a_sum_indices {tuple(idx.shape)} and a_sum_values "
                             f"{tuple(values.shape)} do not form a sparse matrix")
        if idx.numel() and (int(idx.min()) < 0 or int(idx[0].max()) >= m_in or int(idx[1].max()) >= m_out):
            raise ValueError(f"{path / MAP_TENSORS}: a_sum_indices reach ({int(idx[0].max())}, {int(idx[1].max())}), "
                             f"outside the ({m_in}, {m_out}) map that {CONFIG} states")


def _data_fingerprints(m: DSPAMap) -> list[str]:
    fp = m.meta.data_fingerprint
    return fp if isinstance(fp, list) else [fp]


def merge_maps(maps: Sequence[DSPAMap], allow_overlap: bool = False) -> DSPAMap:
    """Count-weighted merge (exact: sums add). All maps must share model, SAEs and options, and be
    fitted on different data (the same data merged twice would count its triples twice) unless
    `allow_overlap`. Only identical data sets are detected (by fingerprint), not partly overlapping ones."""
    if not maps:
        raise ValueError("nothing to merge")
    keys = ("model", "model_fingerprint", "l_in", "l_out", "sae_in", "sae_out", "options")
    first = maps[0]

    def identity(m: DSPAMap, key: str) -> str:
        return json.dumps(dataclasses.asdict(m.meta)[key], sort_keys=True)

    for other in maps[1:]:
        for key in keys:
            if identity(other, key) != identity(first, key):
                raise ValueError(f"cannot merge DSPA maps: they differ in {key!r}")
    if not allow_overlap:
        seen: dict[str, int] = {}
        for i, m in enumerate(maps, 1):
            for fp in _data_fingerprints(m):
                if fp in seen:
                    raise ValueError(f"cannot merge DSPA maps: maps {seen[fp]} and {i} were fitted on the same data "
                                     f"(data fingerprint {fp}), which would count its triples twice; "
                                     "pass --allow-overlap (allow_overlap=True) to merge anyway")
            seen.update(dict.fromkeys(_data_fingerprints(m), i))
    a_sum = SparseSum(first.a_sum.m_in, first.a_sum.m_out)
    for m in maps:
        a_sum += m.a_sum
    costs = [m.meta.cost for m in maps]
    meta = dataclasses.replace(first.meta, data_fingerprint=[fp for m in maps for fp in _data_fingerprints(m)],
                               merged_from=len(maps), cost=combine("dspa fit", costs) if all(costs) else None)
    repe = None if any(m.repe_sum is None for m in maps) else sum(m.repe_sum.double() for m in maps)
    deltas = None if any(m.delta_sum is None for m in maps) else sum(m.delta_sum.double() for m in maps)
    return DSPAMap(a_sum, sum(m.g_sum.double() for m in maps), sum(m.count for m in maps), meta, repe, deltas)


# ---------------------------------------------------------------------------------------------------
# Fitting


def prompt_statistic(u: torch.Tensor, mask: torch.Tensor, stat: Literal["density", "mean"]) -> torch.Tensor:
    """g(x): per row, the mean over masked positions of 1[u > 0] (density) or of u (mean)."""
    values = (u > 0).float() if stat == "density" else u.float()
    m = mask.unsqueeze(-1).float()
    return (values * m).sum(1) / m.sum(1).clamp_min(1.0)


def first_real_position(attention_mask: torch.Tensor) -> torch.Tensor:
    return attention_mask.long().argmax(dim=1)


def encode_masked(sae: SAE, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SAE latents at masked positions only, scattered back to (batch, seq, d_sae) (zeros elsewhere)."""
    out = torch.zeros(*mask.shape, sae.d_sae, dtype=torch.float32, device=hidden.device)
    if mask.any():
        out[mask] = sae.encode(hidden[mask].float())
    return out


@dataclass
class FitOptions:
    """How a map is fitted. All of it changes the numbers, so all of it is part of a fit's identity: a
    checkpoint or finished map made with other options is never resumed or reused."""

    stat: Literal["density", "mean"] = field(default="density", metadata={
        "help": "Prompt statistic g(x): density of active input latents (paper) or their mean activation."})
    exclude_sinks: bool = field(default=True, metadata={
        "help": "Drop first/sink tokens from g and rho, as everywhere else (activations.keep_mask)."})
    sink_factor: float = field(default=DEFAULT_SINK_FACTOR, metadata={
        "help": "A token is a sink when its residual norm exceeds this multiple of the batch median.", "gt": 0})
    batch_size: int = field(default=8, metadata={"help": "Triples per forward batch.", "ge": 1})
    max_length: int = field(default=1024, metadata={
        "help": "Tokens per [prompt; response] (prompt end and response start kept).", "ge": 2})

    def __post_init__(self) -> None:
        check_config(self)


@dataclass
class FitData:
    """Which triples a map was fitted on, as `dspa fit` selected them."""

    source: str
    role: str | None = None
    n: int | None = None
    seed: int | None = None


@dataclass
class SweepEntry:
    """One scored setting of a validation sweep."""

    method: Literal["dspa", "static-sae", "repe"]
    setting: SteeringOptions
    metrics: dict[str, Any]  # `eval.pref.preference_metrics` of the setting against the base model
    seconds: float | None = None


@dataclass
class SweepRecord:
    """The validation sweep that chose a map's recommended settings (`saealign dspa tune`): the data, the rule,
    and every setting's score, so the choice can be checked and redrawn."""

    data: FitData
    data_fingerprint: str
    max_length: int
    rule: str
    base: dict[str, Any]  # the base model's own preference metrics on the same pairs
    entries: list[SweepEntry] = field(default_factory=list)
    base_pass_seconds: float | None = None


@dataclass
class Recommended:
    """Steering settings chosen on held-out data for each method this map drives; what `load_method` uses when a
    knob is not given. An empty setting recommends nothing (the paper's defaults apply)."""

    dspa: LatentSteering = field(default_factory=LatentSteering)
    static_sae: LatentSteering = field(default_factory=LatentSteering)
    repe: SteeringOptions = field(default_factory=SteeringOptions)
    source: str | None = None  # what chose them (a command, a script)
    sweep: SweepRecord | None = None  # the sweep behind the choice, when `dspa tune` made it

    def __post_init__(self) -> None:
        latent = self.repe.steering_options().keys() - {"coef"}
        if latent:
            raise ConfigError(f"repe.{sorted(latent)[0]}", "is not a setting of RepE (it takes coef)")


@dataclass
class MapMetadata:
    """What a map belongs to (model, layers, SAEs, data, fit options) and the settings recommended for it;
    written as the map's config.json (with `kind`, `format_version`, the count and the tensor manifest)."""

    model: str
    l_in: int
    l_out: int
    sae_in: dict[str, Any]  # `SAE.describe()`: fingerprint, hook name, width, architecture, source
    sae_out: dict[str, Any]
    m_in: int
    m_out: int
    options: FitOptions
    data_fingerprint: str | list[str]  # a list for merged maps
    d_model: int | None = None
    model_fingerprint: str | None = None  # None: fitted before weight fingerprints were recorded
    model_dtype: str | None = None
    seed: int | None = None
    threshold: float = field(default=0.0, metadata={"ge": 0})  # tau of a setting that names none (`dspa fit --threshold`)
    data: FitData | None = None
    fit_seconds: float | None = None
    cost: dict[str, Any] | None = None  # `saealign.cost` record of the fit's passes (the draw's, for a snapshot)
    merged_from: int | None = None
    saealign_version: str = __version__
    recommended: Recommended = field(default_factory=Recommended)

    def __post_init__(self) -> None:
        check_config(self)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "dspa_map", "format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, config: dict[str, Any], where: Path) -> "MapMetadata":
        """The typed form of a map's config.json; maps of format 1 (or unversioned) have their known keys read
        into it. An unknown key is refused, naming it and the file."""
        config = {k: v for k, v in config.items() if k not in _STORED}
        kind = config.pop("kind", None)
        if kind != "dspa_map":
            raise ValueError(f"{where}: not a DSPA map (kind={kind!r})")
        version = config.pop("format_version", 1)
        if version == 1:
            config = _from_format_1(config)
        elif version != FORMAT_VERSION:
            raise ValueError(f"{where}: DSPA map format {version!r}, but this saealign reads formats 1 and {FORMAT_VERSION}")
        return _typed(cls, config, where, "")


def _from_format_1(config: dict[str, Any]) -> dict[str, Any]:
    """Format 1: the recommended settings sat under loose top-level keys, and `stat` repeated options.stat."""
    config.pop("stat", None)
    config["recommended"] = {"dspa": config.pop("recommended", {}), "static_sae": config.pop("recommended_static", {}),
                             "repe": config.pop("recommended_repe", {}), "source": config.pop("recommended_from", None)}
    return config


def _dataclass_inside(tp: Any) -> type | None:
    """The dataclass a field holds (itself, inside `X | None`, or the items of `list[X]`); None otherwise."""
    if dataclasses.is_dataclass(tp):
        return tp
    return next((inner for arg in typing.get_args(tp) if (inner := _dataclass_inside(arg)) is not None), None)


def _typed(cls: type, data: Any, where: Path, key: str) -> Any:
    """`cls(**data)` with nested dataclasses built alike, refusing a key `cls` does not declare (or a bad value)
    with the file and the key's path named."""
    label = key or "the top level"
    if not isinstance(data, dict):
        raise ValueError(f"{where}: {label} must be an object ({cls.__name__}), got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        name = f"{key}.{unknown[0]}" if key else unknown[0]
        raise ValueError(f"{where}: unknown key {name!r} in the DSPA map's metadata (known at {label}: "
                         f"{', '.join(sorted(known))})")
    values = {}
    for name, value in data.items():
        inner = _dataclass_inside(hints[name])
        if inner is None or value is None:
            values[name] = value
        elif isinstance(value, list):
            values[name] = [_typed(inner, item, where, f"{key}.{name}[{i}]".lstrip(".")) for i, item in enumerate(value)]
        else:
            values[name] = _typed(inner, value, where, f"{key}.{name}".lstrip("."))
    try:
        return cls(**values)
    except ConfigError as err:
        raise ValueError(f"{where}: {key + '.' if key else ''}{err}") from err
    except TypeError as err:  # a required key is missing
        raise ValueError(f"{where}: {label}: {err}") from err


def read_metadata(path: str | Path) -> MapMetadata:
    """The typed metadata of a saved map (without loading its tensors)."""
    file = Path(path) / CONFIG
    return MapMetadata.from_json(read_json(file), file)


_STORED = ("count", "nnz", "tensors")  # config.json keys that describe the tensors, not the map's metadata


def record_recommended(path: str | Path, recommended: Recommended) -> None:
    """Record steering settings chosen on held-out data in a saved map (what `DSPA.load`, `StaticSAE.load` and
    `RepE.load` use when a knob is not given), in one atomic write; a format-1 map is rewritten in this format."""
    file = Path(path) / CONFIG
    stored = read_json(file)
    meta = dataclasses.replace(read_metadata(path), recommended=recommended)
    write_json(file, {**meta.to_json(), **{k: stored[k] for k in _STORED if k in stored}})


def fit_batch(model, sae_in: SAE, sae_out: SAE, batch_c: dict, batch_r: dict, options: FitOptions,
              meter: CostMeter | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g, delta, h_diff) of one SAE pair for one batch of triples (`pair_statistics` with one pair)."""
    g, delta, h_diff = pair_statistics(model, [sae_in], [sae_out], batch_c, batch_r, options, meter)
    return g[0], delta[0], h_diff[0]


@torch.no_grad()
def pair_statistics(model, sae_ins: Sequence[SAE], sae_outs: Sequence[SAE], batch_c: dict, batch_r: dict,
                    options: FitOptions, meter: CostMeter | None = None
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """For one batch of triples: g of every input SAE, and delta and h_diff of every output SAE, from one
    chosen pass (reading every layer) and one rejected pass (output layers only), so a grid of layer pairs
    costs two passes, not two per pair. h_diff is the chosen-minus-rejected mean residual at an output
    layer over the same response tokens. With a `meter`, both passes (SAE encoders included) are counted."""
    out_layers = sorted({sae.layer for sae in sae_outs})
    all_layers = sorted({*(sae.layer for sae in sae_ins), *out_layers})
    dev = next(model.parameters()).device

    def run(batch: dict, layers: list[int]):
        ids, attn = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        return read_residuals(model, ids, attn, layers), attn, batch["response_mask"].to(dev)

    def usable(hidden: torch.Tensor, attn: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        if not options.exclude_sinks:
            return region & attn.bool()
        return region & keep_mask(hidden, attn, options.sink_factor, first_real_position(attn))

    def density(sae: SAE, hidden: torch.Tensor, mask: torch.Tensor, stat: str, counted) -> torch.Tensor:
        counted.extra(int(mask.sum()), sae.d_in, sae.d_sae)
        return prompt_statistic(encode_masked(sae, hidden, mask), mask, stat)

    def responses(batch: dict, layers: list[int], counted) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
        hidden, attn, resp = run(batch, layers)
        masks = {layer: usable(hidden[layer], attn, resp) for layer in out_layers}
        rho = [density(sae, hidden[sae.layer], masks[sae.layer], "density", counted) for sae in sae_outs]
        means = [prompt_statistic(hidden[layer], masks[layer], "mean") for layer in out_layers]
        return rho, means, hidden

    with measured(meter, *batch_c["input_ids"].shape, layers=all_layers[-1] + 1, lm_head=False) as counted:
        rho_c, mean_c, hidden_c = responses(batch_c, all_layers, counted)
        attn_c = batch_c["attention_mask"].to(dev)
        prompt_region = attn_c.bool() & ~batch_c["response_mask"].to(dev)
        g = [density(sae, hidden_c[sae.layer], usable(hidden_c[sae.layer], attn_c, prompt_region), options.stat, counted)
             for sae in sae_ins]
    with measured(meter, *batch_r["input_ids"].shape, layers=out_layers[-1] + 1, lm_head=False) as counted:
        rho_r, mean_r, _ = responses(batch_r, out_layers, counted)
    delta = [c - r for c, r in zip(rho_c, rho_r)]
    h_diff = [mean_c[out_layers.index(sae.layer)] - mean_r[out_layers.index(sae.layer)] for sae in sae_outs]
    return g, delta, h_diff


def new_map(model, sae_in: SAE, sae_out: SAE, options: FitOptions, data_fingerprint: str, seed: int | None) -> DSPAMap:
    if sae_in.layer >= sae_out.layer:
        raise ValueError(f"DSPA needs l_in < l_out (got input SAE at layer {sae_in.layer}, output SAE at {sae_out.layer})")
    meta = MapMetadata(model=model_id(model), model_fingerprint=model_fingerprint(model),
                       model_dtype=str(next(model.parameters()).dtype).removeprefix("torch."), l_in=sae_in.layer,
                       l_out=sae_out.layer, sae_in=sae_in.describe(), sae_out=sae_out.describe(), m_in=sae_in.d_sae,
                       m_out=sae_out.d_sae, d_model=sae_out.d_in, options=options, data_fingerprint=data_fingerprint,
                       seed=seed)
    return DSPAMap(SparseSum(sae_in.d_sae, sae_out.d_sae), torch.zeros(sae_in.d_sae, dtype=torch.float64), 0, meta,
                   torch.zeros(sae_out.d_in, dtype=torch.float64), torch.zeros(sae_out.d_sae, dtype=torch.float64))


def _settings(meta: MapMetadata, model_key: str) -> dict[str, Any]:
    """What a fit's numbers depend on, by name."""
    return {model_key: getattr(meta, model_key), "model_dtype": meta.model_dtype,
            "sae_in": meta.sae_in["fingerprint"], "sae_out": meta.sae_out["fingerprint"],
            "data_fingerprint": meta.data_fingerprint, **dataclasses.asdict(meta.options)}


def _refuse_other_settings(saved: MapMetadata, wanted: MapMetadata, where: Path) -> None:
    """Refuse to resume or reuse a fit made with other settings, naming each difference. Fits saved
    before weights fingerprints (or other settings) were recorded are compared on what they record."""
    model_key = "model_fingerprint" if saved.model_fingerprint is not None else "model"
    have, want = _settings(saved, model_key), _settings(wanted, model_key)
    diffs = differing_settings(have, want, unrecorded_agree=True)
    if diffs:
        raise ValueError(f"{where}: holds a fit with other settings ({diffs}); "
                         "pass --overwrite (overwrite=True) to start afresh, or use another output directory")


def _save_whole(dspa_map: DSPAMap, path: Path) -> None:
    """Save into a directory of its own in one atomic step (tensors and config appear together),
    replacing an older one."""
    shutil.rmtree(path, ignore_errors=True)
    with atomic_dir(path) as tmp:
        dspa_map.save(tmp)


def _clear_fit(out: Path) -> None:
    """Remove what an earlier fit left in `out` (checkpoints, snapshots, the map) for `overwrite`."""
    for old in [out / "partial", *out.glob("snapshot_*")]:
        shutil.rmtree(old, ignore_errors=True)
    for name in (MAP_TENSORS, CONFIG):
        (out / name).unlink(missing_ok=True)


def fit_map(model, tokenizer, sae_in: SAE, sae_out: SAE, triples, options: FitOptions | None = None,
            checkpoint_dir: str | Path | None = None, checkpoint_every: int = 256, snapshots: Sequence[int] = (),
            seed: int | None = None, progress: bool = True, overwrite: bool = False) -> DSPAMap:
    """Fit the map on `triples` (in the given order).

    With `checkpoint_dir`, partial sums are saved every `checkpoint_every` triples (each checkpoint
    one atomic directory under `partial/`) and a rerun resumes after the last saved one; the finished
    map is saved to `checkpoint_dir` and the checkpoints removed, and a rerun into it returns it. A
    checkpoint or finished map from other settings (model weights and dtype, SAEs, data, options) is
    refused unless `overwrite`, which starts afresh. `snapshots` (e.g. [1000]) also saves the map over
    the first n triples to `checkpoint_dir/snapshot_{n}` — nested restrictions from one pass.
    """
    return fit_maps(model, tokenizer, [(sae_in, sae_out)], triples, options, [checkpoint_dir], checkpoint_every,
                    snapshots, seed, progress, overwrite)[0]


def fit_maps(model, tokenizer, pairs: Sequence[tuple[SAE, SAE]], triples, options: FitOptions | None = None,
             checkpoint_dirs: Sequence[str | Path | None] | None = None, checkpoint_every: int = 256,
             snapshots: Sequence[int] = (), seed: int | None = None, progress: bool = True,
             overwrite: bool = False) -> list[DSPAMap]:
    """The maps of several (input SAE, output SAE) pairs on the same `triples`, from shared forward passes
    (`pair_statistics`): a layer grid costs what its deepest pair costs, plus the SAE encoders. Each map is
    exactly the one `fit_map` gives for its pair, saved, checkpointed and resumed in its own directory as
    `fit_map` does; maps that stopped at different points resume group by group. The recorded cost and fit
    time of each map are those of the shared passes."""
    from saealign.data import triples_fingerprint

    if not triples:
        raise ValueError("no preference triples to fit a DSPA map on")
    options = options or FitOptions()
    dirs = [Path(d) if d else None for d in (checkpoint_dirs or [None] * len(pairs))]
    if len(dirs) != len(pairs):
        raise ValueError(f"{len(pairs)} SAE pairs but {len(dirs)} checkpoint directories")
    device = next(model.parameters()).device
    moved: dict[int, SAE] = {}  # a grid shares each SAE among several pairs: check and move it once
    for sae in (sae for pair in pairs for sae in pair):
        if id(sae) not in moved:
            sae.check_model(model)
            moved[id(sae)] = sae.to(device)
    pairs = [(moved[id(a)], moved[id(b)]) for a, b in pairs]
    fingerprint = triples_fingerprint(triples)
    maps: list[DSPAMap | None] = [None] * len(pairs)
    pending: list[int] = []
    for i, ((sae_in, sae_out), out) in enumerate(zip(pairs, dirs)):
        maps[i], finished = _start_fit(new_map(model, sae_in, sae_out, options, fingerprint, seed), out, overwrite)
        if not finished:
            pending.append(i)
    for start in sorted({maps[i].count for i in pending}):
        group = [i for i in pending if maps[i].count == start]
        done = _fit_group(model, tokenizer, [pairs[i] for i in group], [maps[i] for i in group], [dirs[i] for i in group],
                          triples, options, checkpoint_every, snapshots, progress)
        for i, m in zip(group, done):
            maps[i] = m
    return maps


def _start_fit(fresh: DSPAMap, out: Path | None, overwrite: bool) -> tuple[DSPAMap, bool]:
    """Where a fit into `out` starts: its last checkpoint, its finished map (True: nothing left to do), or `fresh`.
    A checkpoint or map with other settings is refused (unless `overwrite`, which clears it)."""
    if out is None:
        return fresh, False
    if overwrite:
        _clear_fit(out)
    state_dir = out / "partial"
    last = max((p for p in state_dir.glob("[0-9]*") if p.is_dir()), default=None)  # zero-padded names
    if last is not None:
        saved = DSPAMap.load(last)
        _refuse_other_settings(saved.meta, fresh.meta, state_dir)
        log.info("resuming DSPA fit after %d triples", saved.count)
        return saved, False
    if (out / CONFIG).exists():
        saved = DSPAMap.load(out)
        _refuse_other_settings(saved.meta, fresh.meta, out)
        log.info("%s already holds this fit; returning it", out)
        return saved, True
    return fresh, False


def _fit_group(model, tokenizer, pairs: list[tuple[SAE, SAE]], maps: list[DSPAMap], dirs: list[Path | None], triples,
               options: FitOptions, checkpoint_every: int, snapshots: Sequence[int], progress: bool) -> list[DSPAMap]:
    """Continue maps that all hold the same first `count` triples to the end of `triples`."""
    from saealign.data import collate_pairs, render_triples, triples_fingerprint

    sae_ins = list({id(a): a for a, _ in pairs}.values())
    sae_outs = list({id(b): b for _, b in pairs}.values())
    slots = [(sae_ins.index(a), sae_outs.index(b)) for a, b in pairs]
    start, seconds_before = maps[0].count, maps[0].meta.fit_seconds or 0.0
    meter = CostMeter("dspa fit", model, resume=maps[0].meta.cost)
    # Segment ends: checkpoints, snapshots and the end. Order is kept across segments (so a count or
    # snapshot means "the first n triples"); inside a segment triples are length-sorted into batches.
    ends = sorted({*range(start + checkpoint_every, len(triples), checkpoint_every),
                   *(n for n in snapshots if start < n < len(triples)), len(triples)} - {start})
    bar = tqdm(total=len(triples), initial=start, desc="DSPA fit" + (f" ({len(maps)} maps)" if len(maps) > 1 else ""),
               unit="triple", disable=not progress)
    t0 = time.time()
    for end in ends:
        rendered = render_triples(tokenizer, triples[start: end], max_length=options.max_length, progress=False)
        order = sorted(range(len(rendered)), key=lambda i: rendered[i].length("both"))
        for b0 in range(0, len(order), options.batch_size):
            items = [rendered[i] for i in order[b0: b0 + options.batch_size]]
            g, delta, h_diff = pair_statistics(model, sae_ins, sae_outs, collate_pairs(items, tokenizer, "chosen", "right"),
                                               collate_pairs(items, tokenizer, "rejected", "right"), options, meter)
            for m, (i, j) in zip(maps, slots):
                m.a_sum.add_outer(g[i].cpu(), delta[j].cpu())
                m.g_sum += g[i].sum(0).double().cpu()
                m.repe_sum += h_diff[j].sum(0).double().cpu()
                if m.delta_sum is not None:  # None: resumed from a checkpoint of an older saealign
                    m.delta_sum += delta[j].sum(0).double().cpu()
                m.count += len(items)
            bar.update(len(items))
        start = end
        snapshot_fingerprint = triples_fingerprint(triples[:end]) if end in snapshots else None
        for m, out in zip(maps, dirs):
            m.meta.fit_seconds = round(seconds_before + time.time() - t0, 2)  # all segments of a resumed fit
            m.meta.cost = meter.result()
            if end in snapshots and out is not None:
                snap = dataclasses.replace(m, meta=dataclasses.replace(m.meta, data_fingerprint=snapshot_fingerprint))
                _save_whole(snap, out / f"snapshot_{end}")
            if out is not None and end < len(triples):
                checkpoint = out / "partial" / f"{end:012d}"
                _save_whole(m, checkpoint)
                for older in (out / "partial").glob("[0-9]*"):
                    if older != checkpoint:
                        shutil.rmtree(older)
    bar.close()
    for m, out in zip(maps, dirs):
        if out is not None:
            m.save(out)
            shutil.rmtree(out / "partial", ignore_errors=True)
    return maps
