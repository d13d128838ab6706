"""L2DConfig: every hyper-parameter of the diffusion path, with its meaning."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

CONFIG_NAME = "l2d_config.json"
WEIGHTS_NAME = "l2d_model.safetensors"

SCHEDULES = ("cosmap", "uniform", "logit_normal")
PATH_VARIANTS = ("lora", "full")
STREAM_INITS = ("encoder", "main")
MERGE_INITS = ("zero", "ramp", "open")
CONTEXTS = ("frozen", "adapted")
DEFAULT_CLASSES = ("math", "code", "general", "other")
IGNORE_INDEX = -100  # a label the loss skips (prompt tokens, padding), as in transformers
WEIGHT_INITS = ("torch", "paper")

# Options that measurements found useless, removed after l2d 0.1.0 (their rows and the commits that
# measured them: benchmarks/README.md, "Removed options"). A saved config that holds one at the
# value it had by default still loads; any other value is refused, naming the last version that ran it.
REMOVED_OPTIONS = {"latent_init": "random", "loss_weighting": "none", "kv_rank": 0, "encoder_input": "scaled",
                   "context_layers": None}
LAST_VERSION_WITH_REMOVED_OPTIONS = "0.1.0"


def write_json_atomic(path: str, payload: dict, sort_keys: bool = False) -> str:
    """Write ``payload`` as indented JSON to ``path`` through a temporary file and a rename, so an
    interrupted write never leaves a half-written config."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=sort_keys)
        f.write("\n")
    os.replace(tmp, path)
    return path


@dataclass
class L2DConfig:
    """Configuration of the diffusion path attached beside a frozen causal LM.

    Args:
        latent_dim: Size ``d`` of the latent token space. Each token's latent is
            ``z(y) = sqrt(d) * phi(E[y]) / ||phi(E[y])||``.
        latent_bias: Whether ``phi`` has a bias (False, the default; True: the reference's, zero at
            init), applied before the normalisation.
        sigma: Scale of the noise at ``t=0``: ``x_t = t z + (1 - t) sigma eps``.
        schedule: Distribution of training timesteps, one per token position:
            ``cosmap`` (``t = 1 - 1 / (tan(pi u / 2) + 1)``), ``uniform`` or ``logit_normal``.
        logit_normal_mean: Mean of the normal behind ``logit_normal``.
        logit_normal_std: Std of the normal behind ``logit_normal``.
        path_variant: ``lora``: the path reuses each layer's frozen q/o/MLP weights plus trainable
            low-rank deltas; ``full``: trainable copies of those weights (stored as full deltas).
        weight_init: How the path's trainable weights start. ``torch`` (default): PyTorch's default
            init of every layer, low-rank ``A`` kaiming-uniform. ``paper`` (the reference's): every
            linear layer of the latent map, the input encoder and the conditioning heads xavier-uniform
            with zero biases (the heads' last layers zero, as always), the time MLP's weights
            ``N(0, 0.02^2)`` with zero biases, low-rank ``A ~ N(0, 1 / rank^2)`` (``B = 0`` either way).
        rank: Rank of the low-rank deltas (``lora`` variant).
        alpha: Scale numerator of the low-rank deltas; a delta contributes ``alpha / rank * B A x``.
        cond_dim: Width of the conditioning vector ``c = MLP(sinusoidal(t)) + class embedding``.
        time_features: Number of sinusoidal features of ``t`` (max period 10000, t in [0, 1]).
        time_scale: What ``t`` is multiplied by before the sinusoid: 1000 (default), so that ``t`` in
            [0, 1] spans the frequencies; 1 (the reference's): ``t`` as it is.
        head_layers: Depth of the conditioning heads (every block's adaLN head and the merge head
            ``m``). 1 (default): ``SiLU -> Linear(cond_dim, out)`` on ``c``. 2 (the reference's):
            ``Linear(cond_dim, cond_dim) -> SiLU -> Linear(cond_dim, out)`` on ``c``. The last layer
            starts at zero either way.
        class_names: Task categories for class conditioning and guidance; a null class is added.
            Empty: no class conditioning at all (no class embedding: ``c`` is the time embedding
            alone), as in the reference's released configs.
        class_dropout: Probability of replacing the class label by the null class in training.
        self_conditioning: Probability, per training step, of a first no-grad pass whose expected
            latent ``softmax(logits) @ Z`` feeds the second pass as ``z_hat``. 0 disables it.
        encoder_hidden: Hidden width of the input encoder MLP (0 means the model's hidden size).
        encoder_z_hat: Whether the input encoder reads the self-conditioning estimate ``z_hat``
            beside ``x_t`` (True, the default: ``[x_t / s(t), z_hat]``, ``2 d`` inputs). False (the
            reference's): ``x_t / s(t)`` alone (``d`` inputs); needs ``self_conditioning=0``.
        stream_init: Where the diffusion stream starts. ``encoder`` (default, the paper's): from the
            encoded latent alone, every block gated shut at init, merge ``h_main + g * h_f``.
            ``main``: from the main path's input to the stream's first layer plus the encoded
            latent, every block starting as an exact copy of its frozen layer (gates open at 1),
            merge of the difference ``h_main + g * (h_f - h_main)``: the stream begins as the base
            computation at that position and learns a correction, as a LoRA does (needed by
            ``stream_layers``).
        merge_init: How the merge gate ``g(t)`` starts. ``zero`` (default, the paper's):
            ``g = m(c_t) - m(c_0)`` with ``m`` zero-initialised: the gate learns where in ``t`` the
            path's output is worth taking, so the many noisy ``t`` of training do not drown what the
            latent carries near ``t = 1``. ``open``: ``g = 1[t > 0] + m(c_t) - m(c_0)``, the path's
            full output at every ``t > 0`` (the base at ``t = 0`` itself), with the input encoder's
            output layer zero-initialised so that the path equals the base at init; every delta gets
            a gradient from the first step, but on the latent-reading probe (random tokens, only the
            latent predicts) it stays at the uniform loss after 300 steps. ``ramp``:
            ``g = t + m(c_t) - m(c_0)``. All three are exactly zero at ``t = 0``.
        adaln_scale: Multiplier on the outputs of every block's zero-initialised adaLN head. Its
            input ``SiLU(c)`` is dense and nearly the same for every token, so under AdamW each
            head's output moves by about ``lr * sum|SiLU(c)|`` per step for every token alike; at
            1.0 (the paper's) the shifts, scales and gates reach rms 1-2 within tens of steps, the
            stream's scale dwarfs the encoded latent and training sits at the uniform plateau
            (benchmarks/README.md, "Reading the latent"). 0.1 (default) acts as a tenth of the
            learning rate for those heads under Adam; the model at init and at ``t = 0`` is unchanged.
        class_init_std: Std of the class embedding's normal init (0.02; N(0, 1) made
            ``sum|SiLU(c)|``, and the heads' drift above, several times larger).
        trajectory_training: Probability per training step of taking the loss where the solver's
            own trajectory is rather than at a noised gold latent: ``k`` of ``N`` no-grad Euler steps
            from noise with the expected-latent estimate, then the loss at ``(x_{k/N}, k/N)``
            against the gold token, so later evaluations learn to correct earlier ones
            (``l2d/trajectory.py``). 0 (default, the paper's) disables it.
        trajectory_steps: Largest grid ``N`` drawn for trajectory training (powers of two up to it).
        context: Whose keys/values the path's queries read. ``frozen`` (default, the paper's): the
            main path's cache as it is, so the path changes only the positions it predicts and
            costs nothing at the others. ``adapted``: a second pass of the frozen layers over every
            position with the path's q/o/MLP deltas switched on (no latent, no conditioning: the
            frozen layers plus the deltas, as a LoRA on q/o/MLP would run), whose keys/values the
            queries read instead; the deltas then also learn how the context is read. The main
            path still runs untouched, so ``t = 0`` and ``steps=0`` stay the base. Costs about a
            LoRA forward and backward per training step on top (gradient checkpointing covers the
            diffusion blocks, not this pass), and one more forward of the base per generated token
            (a second cache). Training skips the main pass when the merge returns the stream as it
            is (``merge_init="open"`` with the conditioning heads frozen).
        stream_layers: How many of the top decoder layers the diffusion stream runs through
            (``None``, the default and the paper's: all, one block per layer). With ``k`` of ``L``
            layers the stream starts at layer ``L-k`` from what that layer receives at the query
            position (the main path's input there, or the adapted context pass's with
            ``context="adapted"``) plus the encoded latent, and only the top ``k`` layers have
            blocks; below ``L-k`` the stream would compute exactly what the main path (or the
            context pass) already computed at that position, except for the latent. A training
            step and every solver evaluation in ``generate`` then cost about ``k / L`` of the
            full stream's. With ``context="adapted"`` the deltas of the layers below still act in
            the context pass, so the path keeps its adapter capacity and only reads its latent
            in fewer layers. Needs ``stream_init="main"`` (the stream takes up what the main
            path computed below). On the SmolLM2 arithmetic
            ablation (adapted context) the top 8 or 4 of 30 layers were as accurate as all 30 and
            made the training step about a LoRA step's (benchmarks/README.md); the SmolLM2 recipe
            uses 8. With the frozen context the lower layers lose their deltas too, and the top 8
            alone learned nothing there: the default keeps the paper's one block per layer.
        base_model_name_or_path: Recorded when wrapping, checked (softly) when loading.
        base_model_revision: Recorded when known.
    """

    latent_dim: int = field(default=256, metadata={"help": "Size d of the latent token space."})
    latent_bias: bool = field(default=False, metadata={"help": "Whether the latent map has a bias."})
    sigma: float = field(default=64.0, metadata={"help": "Noise scale at t=0."})
    schedule: str = field(default="cosmap", metadata={"help": f"Training timestep schedule: {SCHEDULES}."})
    logit_normal_mean: float = field(default=0.0, metadata={"help": "Mean for logit_normal."})
    logit_normal_std: float = field(default=1.0, metadata={"help": "Std for logit_normal."})
    path_variant: str = field(default="lora", metadata={"help": f"Path weights: {PATH_VARIANTS}."})
    weight_init: str = field(default="torch", metadata={"help": f"Init of the path's weights: {WEIGHT_INITS}."})
    rank: int = field(default=32, metadata={"help": "Rank of the low-rank deltas."})
    alpha: float = field(default=32.0, metadata={"help": "Low-rank scale numerator (alpha / rank)."})
    cond_dim: int = field(default=256, metadata={"help": "Width of the conditioning vector c."})
    time_features: int = field(default=256, metadata={"help": "Sinusoidal features of t."})
    time_scale: float = field(default=1000.0, metadata={"help": "Multiplier on t before the sinusoid."})
    head_layers: int = field(default=1, metadata={"help": "Depth of the conditioning heads (adaLN, merge): 1 or 2."})
    class_names: tuple = field(default=DEFAULT_CLASSES, metadata={"help": "Task categories."})
    class_dropout: float = field(default=0.2, metadata={"help": "Null-class probability in training."})
    self_conditioning: float = field(default=0.5, metadata={"help": "Self-conditioning probability."})
    encoder_hidden: int = field(default=0, metadata={"help": "Input encoder width (0: hidden size)."})
    encoder_z_hat: bool = field(default=True, metadata={"help": "Whether the input encoder reads z_hat."})
    stream_init: str = field(default="encoder", metadata={"help": f"Diffusion stream start: {STREAM_INITS}."})
    merge_init: str = field(default="zero", metadata={"help": f"Merge gate at init: {MERGE_INITS}."})
    context: str = field(default="frozen", metadata={"help": f"Keys/values the path reads: {CONTEXTS}."})
    stream_layers: int | None = field(default=None, metadata={
        "help": "top decoder layers the diffusion stream runs through (None: all)."})
    trajectory_training: float = field(default=0.0, metadata={
        "help": "Probability per training step of training on the solver's own trajectory."})
    trajectory_steps: int = field(default=16, metadata={
        "help": "Largest solver grid (a power of two) drawn for trajectory training."})
    adaln_scale: float = field(default=0.1, metadata={
        "help": "Multiplier on the adaLN heads' outputs (0.1: a tenth of their Adam step)."})
    class_init_std: float = field(default=0.02, metadata={"help": "Std of the class embedding's init."})
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "Base model id."})
    base_model_revision: str | None = field(default=None, metadata={"help": "Base model revision."})

    def __post_init__(self):
        self.class_names = tuple(self.class_names)
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the first field that is out of range."""
        checks = [
            (self.latent_dim > 0, "latent_dim must be a positive integer"),
            (self.sigma > 0, "sigma must be positive"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (self.logit_normal_std > 0, "logit_normal_std must be positive"),
            (self.path_variant in PATH_VARIANTS,
             f"path_variant must be one of {PATH_VARIANTS}, got {self.path_variant!r}"),
            (self.rank > 0, "rank must be a positive integer"),
            (self.weight_init in WEIGHT_INITS,
             f"weight_init must be one of {WEIGHT_INITS}, got {self.weight_init!r}"),
            (self.time_scale > 0, "time_scale must be positive"),
            (self.head_layers in (1, 2), f"head_layers must be 1 or 2, got {self.head_layers!r}"),
            (isinstance(self.latent_bias, bool), "latent_bias must be True or False"),
            (isinstance(self.encoder_z_hat, bool), "encoder_z_hat must be True or False"),
            (self.encoder_z_hat or self.self_conditioning == 0,
             "encoder_z_hat=False needs self_conditioning=0 (the encoder would not see the estimate)"),
            (self.cond_dim > 0 and self.time_features > 0 and self.time_features % 2 == 0,
             "cond_dim must be positive and time_features a positive even number"),
            (0.0 <= self.class_dropout <= 1.0, "class_dropout must lie in [0, 1]"),
            (0.0 <= self.self_conditioning <= 1.0, "self_conditioning must lie in [0, 1]"),
            (0.0 <= self.trajectory_training <= 1.0, "trajectory_training must lie in [0, 1]"),
            (self.trajectory_steps >= 1, "trajectory_steps must be a positive integer"),
            (self.adaln_scale > 0, "adaln_scale must be positive"),
            (self.class_init_std > 0, "class_init_std must be positive"),
            (self.encoder_hidden >= 0, "encoder_hidden must be >= 0"),
            (self.stream_init in STREAM_INITS,
             f"stream_init must be one of {STREAM_INITS}, got {self.stream_init!r}"),
            (self.merge_init in MERGE_INITS,
             f"merge_init must be one of {MERGE_INITS}, got {self.merge_init!r}"),
            (self.context in CONTEXTS, f"context must be one of {CONTEXTS}, got {self.context!r}"),
            (self.stream_layers is None or self.stream_layers >= 1,
             "stream_layers must be a positive number of layers (or None: all)"),
            (self.stream_layers is None or self.stream_init == "main",
             "stream_layers needs stream_init='main' (the stream takes up the main path's hidden state "
             "at its first layer)"),
            (len(set(self.class_names)) == len(self.class_names), "class_names must be unique"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"L2DConfig: {message}.")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def paper(cls, **overrides) -> "L2DConfig":
        """The authors' released ``lad_lora`` configuration (SakanaAI/L2D at 456871e,
        ``cfgs/model/*_lad_lora.cfg``), which our path then computes to float precision
        (tests/test_paper_preset.py checks it against the reference's own outputs).

        Every field is set explicitly (:data:`PAPER_SETTINGS`), so later changes of the defaults
        leave the preset alone; ``overrides`` replace any of them, e.g. ``L2DConfig.paper(rank=8)``.
        Its training recipe (uniform ``t``, AdamW (0.9, 0.95), lr 1e-4, ...) and decoding protocol
        (``l2d.generation.DECODING_PROTOCOLS["paper"]``) live elsewhere; see DESIGN.md.
        """
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"L2DConfig.paper: unknown keys {unknown}.")
        return cls(**{**PAPER_SETTINGS, **overrides})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "L2DConfig":
        d = drop_removed_options(d, "L2DConfig")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"L2DConfig: unknown keys {unknown}; known keys are {sorted(known)}.")
        return cls(**d)

    def save(self, directory: str, extra: dict | None = None) -> str:
        """Write ``l2d_config.json`` atomically; ``extra`` holds provenance (base fingerprint, version)."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        payload = {**self.to_dict(), **({"_l2d": extra} if extra else {})}
        return write_json_atomic(path, payload, sort_keys=True)

    @classmethod
    def load(cls, directory: str) -> tuple["L2DConfig", dict]:
        """Read ``l2d_config.json``; returns the config and its provenance block."""
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No {CONFIG_NAME} in {directory!r}: is this an l2d adapter saved with save_pretrained?")
        try:
            with open(path) as f:
                payload = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); the adapter file is corrupt.") from e
        extra = payload.pop("_l2d", {})
        return cls.from_dict(payload), extra


def drop_removed_options(d: dict, where: str) -> dict:
    """``d`` without the :data:`REMOVED_OPTIONS` it holds at their old defaults; a ValueError for one
    set to anything else (a config written for l2d 0.1.0 that used the option)."""
    used = sorted(k for k in d if k in REMOVED_OPTIONS and d[k] != REMOVED_OPTIONS[k])
    if used:
        raise ValueError(f"{where}: {', '.join(f'{k}={d[k]!r}' for k in used)}: this option was removed after "
                         f"l2d {LAST_VERSION_WITH_REMOVED_OPTIONS} (measured useless, see benchmarks/README.md, "
                         f"\"Removed options\"); load this adapter with l2d {LAST_VERSION_WITH_REMOVED_OPTIONS}, "
                         "or drop the option.")
    return {k: v for k, v in d.items() if k not in REMOVED_OPTIONS}


# L2DConfig.paper(): the reference's released lad_lora configuration, every field spelled out.
PAPER_SETTINGS = dict(
    latent_dim=256,            # flow_representation_dim
    latent_bias=True,          # flow_representation_num_layers = 1: one Linear(H, 256) with a bias
    sigma=64.0,                # noise_rescaling
    schedule="uniform",        # noise_schedule = identity
    logit_normal_mean=0.0,
    logit_normal_std=1.0,
    path_variant="lora",       # separate_flow_params_with_lora
    weight_init="paper",
    rank=32,                   # flow_lora_rank
    alpha=32.0,                # flow_lora_alpha
    cond_dim=256,              # timestep_modulation_hidden_size
    time_features=256,         # timestep_modulation_freq_embedding_size
    time_scale=1.0,
    head_layers=2,
    class_names=(),            # no data-split guidance in the released configs
    class_dropout=0.0,
    class_init_std=0.02,
    self_conditioning=0.0,
    trajectory_training=0.0,   # the reference trains on noised gold latents only
    trajectory_steps=16,
    encoder_hidden=256,        # flow_to_lm_hidden_size, flow_to_lm_translation_depth = 2
    encoder_z_hat=False,
    stream_init="encoder",
    merge_init="zero",         # preserve_behavior_at_flow_start: m(c_t) - m(c_0)
    context="frozen",
    stream_layers=None,
    adaln_scale=1.0,
)
