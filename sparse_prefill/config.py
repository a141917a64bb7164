"""SparsePrefillConfig: every knob of the sparse prefill, validated once.

The defaults are the ones we benchmark (see bench/RESULTS.md). Each field says what it trades: more
kept blocks cost time and buy accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

_BACKENDS = ("auto", "triton", "torch")
_ATTENTION_DTYPES = ("auto", "fp8")  # kernels/support.ATTENTION_DTYPES (not imported: this module imports no torch)
_BLOCK_SIZES = (64, 128)


def _knob(default, metavar: str, meaning: str):
    """A config field with what its command-line flag takes (`metavar`) and means (`meaning`), in its metadata."""
    return field(default=default, metadata={"metavar": metavar, "meaning": meaning})


@dataclass(frozen=True)
class SparsePrefillConfig:
    """How block-sparse prefill chooses and computes attention.

    The defaults are the configuration measured end to end on trained models (docs/results.md;
    bench/RESULTS.md, "Answers kept at scale, and gamma 0.95 as the default" and the sections after
    it). They keep dense's answers first; `gamma=0.9` is the faster setting measured beside them,
    which changes more of dense's answers at 16K-32K.

    Attributes:
        block_size: tokens per query block and per key block (64 or 128). Smaller blocks select more
            precisely but cost more selection work per token.
        gamma: share of each head's attention mass that the kept key blocks must cover, in (0, 1].
            1.0 keeps every causal block (exact dense attention, computed block-sparsely).
        min_budget_tokens: every (head, query block) keeps at least this many key tokens' worth of
            blocks (rounded up to blocks), so short rows and flat heads are never starved.
        sink_blocks: leading key blocks always kept (attention sinks; the first tokens draw mass in
            every trained model).
        local_blocks: key blocks right before each query block's diagonal that are always kept. The
            causal diagonal block(s) themselves are always kept on top of this.
        exact_tail_tokens: the query blocks holding the last this-many queries attend every causal
            key block (exact attention). A prompt's question sits there, and the last query alone
            decides the first answer token; keeping these rows dense costs about
            2 * exact_tail_tokens / Lq of causal dense attention's work (the last rows are the
            longest). 0 turns it off.
        question_blocks: each head's this-many key blocks that its last query block attends most
            (exactly measured, beyond sink/local/diagonal) are kept for every query block after them:
            a needle the question reads is also seen by the rows that mention it again later (several
            values for one key). At most question_blocks more blocks per row, none in rows before them.
        stride: the estimate averages each run of `stride` consecutive queries, and of keys, into
            one; larger is cheaper (stride^2) and coarser. It must divide `block_size`.
        proxy_heads: "q" estimates every query head on its own; "kv" pools the query heads of each
            KV group into one proxy head (ProxyAttn: cheaper, but it ranks poorly for heads unlike
            their group); an int asks for that many proxies (it must divide the number of KV heads,
            or be a multiple of it that divides the number of query heads).
        min_seq_len: prefill calls whose key length is below this stay dense and exact. None picks
            `auto_min_seq_len()`, the length above which sparse prefill has paid on an H100/H200 GPU.
        backend: "auto" uses the Triton kernels for fp16/bf16 on CUDA and the PyTorch reference
            elsewhere; "triton" or "torch" force one.
        attention_dtype: the arithmetic of the sparse path's attention products. "auto" computes them in
            the inputs' dtype (fp16/bf16, fp32 accumulation). "fp8" rounds Q, K (smoothed by its mean),
            P and V to float8 e4m3 with per-block scales and accumulates in fp32 (docs/kernel.md, "FP8
            attention": what it costs in error): the Triton FP8 kernel on Hopper and newer at head_dim 128
            and 256, the PyTorch FP8 reference where the reference runs (CPU; backend="torch"); elsewhere
            (an older GPU, head_dim below 128, where it measured slower) it falls back to "auto" with one
            warning that says why. Measured 1.17-1.22x the bf16 kernel on the 8B shape at 128K, 1.04x end
            to end: not the default (docs/configuration.md says when to use it). The selection always runs
            in the inputs' dtype: it is ~2 % of dense attention's time at 128K, and it ranks blocks, where
            rounding moves the budget.
            The name and values are vLLM's `--kv-cache-dtype auto|fp8` ("auto": the model's dtype; "fp8":
            e4m3 with scales), which serving users know; a dtype rather than a bool (TensorRT-LLM's
            `use_fp8_context_fmha`) leaves room for another format without a second field.
    """

    # Each field's `meaning` is its one-line help wherever it is a flag (the eval commands, `sparse-prefill serve`);
    # `metavar` says what the flag takes. The attributes above explain them at length.
    block_size: int = _knob(128, "64|128", "tokens per query and key block")
    gamma: float = _knob(0.95, "G", "share of each head's attention mass the kept blocks must cover, in (0, 1]; "
                                    "1 keeps every causal block")
    min_budget_tokens: int = _knob(1024, "N", "every (head, query block) keeps at least this many keys' worth of "
                                              "blocks")
    sink_blocks: int = _knob(1, "N", "leading key blocks always kept")
    local_blocks: int = _knob(1, "N", "key blocks before the diagonal always kept (the diagonal itself always is)")
    exact_tail_tokens: int = _knob(256, "N", "the query blocks holding the last N queries attend every causal block "
                                             "(0: off)")
    question_blocks: int = _knob(8, "N", "each head's N blocks most read by its exact last query block, kept for every "
                                         "later row (0: off)")
    stride: int = _knob(16, "S", "the estimate averages runs of S queries and keys into one; must divide the block "
                                 "size")
    proxy_heads: str | int = _knob("q", "q|kv|N", "q estimates every query head on its own, kv one proxy per KV group, "
                                                  "N that many proxies")
    min_seq_len: int | None = _knob(None, "N|auto", "prefill with fewer keys than this stays dense; auto: max(12288, "
                                                    "4 x min_budget_tokens), the measured break-even on small models")
    backend: str = _knob("auto", "auto|triton|torch", "auto: the Triton kernels on CUDA fp16/bf16, the PyTorch "
                                                      "reference elsewhere; triton or torch force one")
    attention_dtype: str = _knob("auto", "auto|fp8", "the sparse attention's products in the inputs' dtype (auto) or "
                                                     "in float8 e4m3 with per-block scales (fp8)")

    def __post_init__(self) -> None:
        def fail(field: str, allowed: str) -> None:
            raise ValueError(
                f"SparsePrefillConfig.{field}={getattr(self, field)!r} is not allowed: {field} must be {allowed}."
            )

        if isinstance(self.block_size, bool) or self.block_size not in _BLOCK_SIZES:
            fail("block_size", "64 or 128")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not 0 < self.gamma <= 1:
            fail("gamma", "a number in (0, 1]; 1.0 keeps every causal block")
        for name in ("min_budget_tokens", "sink_blocks", "local_blocks", "exact_tail_tokens", "question_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                fail(name, "an int >= 0")
        if (isinstance(self.stride, bool) or not isinstance(self.stride, int) or not 1 <= self.stride <= self.block_size
                or self.block_size % self.stride):
            fail("stride", f"an int >= 1 that divides block_size={self.block_size} (1, 2, 4, 8, ...)")
        if self.proxy_heads not in ("q", "kv") and (
            isinstance(self.proxy_heads, bool) or not isinstance(self.proxy_heads, int) or self.proxy_heads < 1
        ):
            fail("proxy_heads", '"q", "kv" or an int >= 1')
        if self.min_seq_len is not None and (
            isinstance(self.min_seq_len, bool) or not isinstance(self.min_seq_len, int) or self.min_seq_len < 0
        ):
            fail("min_seq_len", "None (automatic) or an int >= 0")
        if self.backend not in _BACKENDS:
            fail("backend", " or ".join(repr(b) for b in _BACKENDS))
        if self.attention_dtype not in _ATTENTION_DTYPES:
            fail("attention_dtype", " or ".join(repr(d) for d in _ATTENTION_DTYPES)
                 + ' ("fp8": float8 e4m3 products with per-block scales)')

    @property
    def min_budget_blocks(self) -> int:
        """`min_budget_tokens` rounded up to whole blocks."""
        return -(-self.min_budget_tokens // self.block_size)

    @property
    def effective_min_seq_len(self) -> int:
        """The dense/sparse threshold actually applied (resolves `min_seq_len=None`)."""
        return auto_min_seq_len(self) if self.min_seq_len is None else self.min_seq_len

    def replace(self, **changes) -> SparsePrefillConfig:
        """A validated copy with some fields changed."""
        return replace(self, **changes)


def as_config(config: SparsePrefillConfig | Mapping | None) -> SparsePrefillConfig:
    """A SparsePrefillConfig from itself, a mapping of its fields (parsed by `config_from_options`), or None
    (the defaults)."""
    if config is None:
        return SparsePrefillConfig()
    if isinstance(config, SparsePrefillConfig):
        return config
    if isinstance(config, Mapping):
        return config_from_options(config)
    raise TypeError(f"config must be a SparsePrefillConfig, a dict of its fields or None; got {type(config).__name__}.")


def auto_min_seq_len(config: SparsePrefillConfig) -> int:
    """Below this key length, selection overhead eats the saving, so prefill stays dense.

    12288 lies between the lengths at which sparse prefill of trained small models was measured slower
    (8K) and faster (16K) than dense on an H200 GPU (bench/RESULTS.md, "Real trained models"), with
    earlier defaults; the current ones select faster but have not been timed below 32K, so it stays.
    A row keeps at least `min_budget_tokens` keys, so a larger budget moves it out: 4x the budget.
    """
    return max(12288, 4 * config.min_budget_tokens)


def config_from_options(options: Mapping[str, object], base: SparsePrefillConfig | None = None) -> SparsePrefillConfig:
    """A validated SparsePrefillConfig from options given as strings or typed values.

    The one parser of configs written as text: command-line flags, lm-eval `--model_args`, bench
    scripts. `options` maps field names (`min_budget_tokens` or `min-budget-tokens`) to values, each
    either already typed or a string converted by the field's type: "0.9" -> 0.9, "128" -> 128;
    proxy_heads keeps "q" and "kv" and turns digits into an int; "none" or "auto" give None where the
    field allows it (min_seq_len: automatic). Fields not given keep their value in `base` (default:
    the library defaults).

    Raises ValueError naming an unknown field (and listing the known ones), or a field and its bad value.
    """
    import dataclasses
    import typing

    types = typing.get_type_hints(SparsePrefillConfig)
    known = [f.name for f in dataclasses.fields(SparsePrefillConfig)]
    words = {int: "an integer", float: "a number", str: "a string", type(None): '"none"/"auto" (automatic)'}

    def convert(field: str, value: object) -> object:
        allowed = typing.get_args(types[field]) or (types[field],)
        kinds = " or ".join(words[t] for t in allowed)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "auto")
                             and type(None) in allowed):
            if type(None) in allowed:
                return None
            raise ValueError(f"SparsePrefillConfig.{field} cannot be None: it must be {kinds}.")
        if isinstance(value, bool):  # bool is an int to Python, never a config value
            raise ValueError(f"SparsePrefillConfig.{field}={value!r} is not allowed: it must be {kinds}, not a bool.")
        if isinstance(value, str):
            text = value.strip()
            for kind in (int, float):  # the numeric types a field takes, the narrowest first
                if kind in allowed:
                    try:
                        return kind(text)
                    except ValueError:
                        pass
            if str in allowed and text:
                return text
            raise ValueError(f"SparsePrefillConfig.{field}={value!r} is not allowed: it must be {kinds}.")
        if isinstance(value, float) and float not in allowed and int in allowed and value.is_integer():
            return int(value)
        if isinstance(value, int) and int not in allowed and float in allowed:
            return float(value)
        if not isinstance(value, allowed):
            raise ValueError(f"SparsePrefillConfig.{field}={value!r} is not allowed: it must be {kinds}.")
        return value

    changes: dict[str, object] = {}
    for name, value in options.items():
        field = str(name).strip().replace("-", "_")
        if field not in types:
            raise ValueError(f"Unknown SparsePrefillConfig field {name!r}; the fields are: {', '.join(known)}.")
        if field in changes:
            raise ValueError(f"SparsePrefillConfig.{field} is given twice (as {field!r} and with dashes).")
        changes[field] = convert(field, value)
    return (base or SparsePrefillConfig()).replace(**changes)


def config_from_text(text: str, base: SparsePrefillConfig | None = None) -> SparsePrefillConfig:
    """A validated SparsePrefillConfig from `field=value` pairs separated by commas, as an environment variable
    or a bench script gives them: "gamma=0.9,min_seq_len=auto". Each value is parsed by `config_from_options`;
    empty text gives `base` (default: the library defaults).

    Raises ValueError for a piece that is no `field=value` pair, a field given twice, and whatever
    `config_from_options` refuses.
    """
    options: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"{item.strip()!r} is not a `field=value` pair; write SparsePrefillConfig fields as "
                             "e.g. 'gamma=0.9,min_seq_len=auto'.")
        if name in options:
            raise ValueError(f"SparsePrefillConfig field {name!r} is given twice in {text!r}.")
        options[name] = value.strip()
    return config_from_options(options, base)
