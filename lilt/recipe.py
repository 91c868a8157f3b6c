"""A recipe: one YAML/JSON file with the sections of a run, parsed once for the CLI, the demo and the API.

    recipe = Recipe.from_file("lwa", ["train.steps=200"])          # a built-in recipe, by name
    recipe = Recipe.from_file("my-recipe.yaml", ["train.steps=200"])  # or any file
    recipe.model, recipe.plan, recipe.data, recipe.train, recipe.eval, recipe.init

Sections: `model` (backbones and heads), `plan` (which parameters train), `data`, `train`, `eval`
(languages to report), `init` (start from a saved model, optionally swapping its text tower). An unknown
section or key anywhere is an error naming the file, the key and the closest accepted spelling.
Torch-free: a recipe is fully checked before torch, timm or transformers load (method options are
checked against the method registry, which loads torch only when a plan names a method).
Built-in recipes ship inside the package (`lilt/recipes/<kind>/<name>.yaml`; `recipes/` at the
repository root is a link to them) and are named by their file's stem: `lilt recipes` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Sequence

from .config import DataConfig, ModelConfig, TrainConfig
from .configbase import ConfigBase, apply_overrides, knob, read_mapping
from .errors import ConfigError, did_you_mean

RECIPES_DIR = Path(__file__).with_name("recipes")
# Accelerate launch configs ship beside the recipes but are not lilt recipes: no name resolves to them.
NOT_RECIPES = ("accelerate",)


def builtin_recipes() -> dict[str, Path]:
    """The shipped recipes by name (the file's stem), e.g. {'lwa': .../lilt/recipes/methods/lwa.yaml}."""
    found: dict[str, Path] = {}
    for path in sorted(RECIPES_DIR.rglob("*.yaml")):
        if path.relative_to(RECIPES_DIR).parts[0] not in NOT_RECIPES:
            found.setdefault(path.stem, path)  # stems are unique (a test holds us to it)
    return found


def resolve_recipe(spec: str | Path) -> Path:
    """The file a recipe argument means: an existing file, else a built-in recipe name (`lwa`, `demo`)."""
    path = Path(spec)
    if path.is_file() or path.is_dir():  # a path wins: read_mapping reports a folder clearly
        return path
    builtin = builtin_recipes()
    if str(spec) in builtin:
        return builtin[str(spec)]
    parts = path.parts
    if len(parts) > 1 and parts[0] == "recipes" and (RECIPES_DIR.joinpath(*parts[1:])).is_file():
        return RECIPES_DIR.joinpath(*parts[1:])  # the repository's recipes/... spelling, from any folder
    if len(parts) > 1 or path.suffix in (".yaml", ".yml", ".json"):
        return path  # meant as a file: read_mapping says it does not exist
    raise ConfigError(f"unknown recipe {str(spec)!r}: no such file, and not a built-in recipe name."
                      f"{did_you_mean(str(spec), builtin)} Built-in: {', '.join(sorted(builtin))} "
                      "(`lilt recipes` describes them); or give a path to a YAML/JSON recipe.")


def _methods() -> Any:
    # The method registry imports torch and peft; importing this module (and checking a recipe's other
    # sections) must not. The registry does not import this module: no import circle.
    import lilt.methods

    return lilt.methods


@dataclass
class Rule(ConfigBase):
    """One step of a plan: apply `method` to `layers` of `tower` with `options`."""

    tower: Literal["vision", "text", "both"] = knob(help="which tower the rule applies to")
    method: str = knob(help="a registered tuning method: lock, layernorm, bitfit, adapter, lora, ia3, "
                       "unlock, deep")
    layers: str = knob("all", "'all', 'top:K', 'bottom:K', 'blocks.I-J' (commas allowed) or a parameter-name glob")
    options: dict = knob({}, "the method's options (see `lilt info --methods`)")

    def validate(self) -> None:
        methods = _methods()
        spec = methods.get_method(self.method)
        methods.check_layers(self.layers)
        self.parsed_options = spec.options.from_dict(self.options, where=f"{self.method} options")

    def label(self, index: int) -> str:
        """A short human name: 'rule 1 (both/adapter, layers=all)'."""
        return f"rule {index + 1} ({self.tower}/{self.method}, layers={self.layers})"


@dataclass
class TuningPlan(ConfigBase):
    """An ordered list of rules, with a name for reports."""

    rules: list[Rule] = knob([], "the rules, applied in order")
    name: str = knob("", "a short name for reports (e.g. 'lwa')")
    description: str = knob("", "one line on what the plan is")
    frozen_heads: list[Literal["vision", "text"]] = knob(
        [], "projection heads that stay frozen (a text-tower swap keeps the trained vision head)")

    @classmethod
    def from_recipe(cls, path: str | Path, overrides: Sequence[str] = ()) -> "TuningPlan":
        """The `plan:` section of a YAML/JSON recipe or built-in recipe name (the whole recipe is checked)."""
        plan = Recipe.from_file(path, overrides).plan
        if plan is None:
            raise ConfigError(f"{path}: no 'plan:' section; a recipe needs one (a list of rules under plan.rules).")
        return plan


@dataclass
class EvalConfig(ConfigBase):
    """What a recipe's run is scored on after training (the demo's table)."""

    langs: list[str] | None = knob(None, "caption languages to report, including ones with no training pairs "
                                   "(zero-shot through the text tower); None: the training languages")
    hubness: bool = knob(False, "score retrieval with the CSLS hubness correction against each model's training "
                         "embeddings, k and beta chosen on the validation split (lilt.eval.hubness)")
    ridge_ensemble: bool = knob(False, "score the trained model mixed with the ridge map on its frozen towers' "
                                "features, the weight chosen on the validation split (lilt.eval.ensemble)")
    translate: bool = knob(False, "translate captions in data.parallel's languages by maps fitted on that parallel "
                           "text, strength chosen per language on the validation split (lilt.eval.translate)")
    ridge_features: Literal["pooled", "stages"] = knob(
        "pooled", "what the ridge map (baseline and ensemble side) reads of each image: 'pooled' features, or "
        "'stages' (pooled plus each vision block's pooled output)")
    ridge_kernel: Literal["linear", "rbf", "rbf-two-way"] = knob(
        "linear", "the ridge map's kind (baseline and ensemble side): 'linear', 'rbf' kernel ridge over the "
        "distinct training images (alpha and width chosen on validation; lilt.baselines.KernelRidgeMap), or "
        "'rbf-two-way': that map plus kernel ridge from captions into the image features, the two cosines mixed "
        "(lilt.baselines.TwoWayMap, Shigeto et al. 2015; every choice on validation)")
    ridge_towers: Literal["frozen", "tuned"] = knob(
        "frozen", "which towers the ensemble's ridge map reads: 'frozen' (the pretrained backbones, as the ridge "
        "baseline) or 'tuned' (the trained model's own towers, the map fitted after training)")

    def validate(self) -> None:
        if self.langs is not None and (not self.langs or not all(self.langs)):
            raise ConfigError(f"EvalConfig.langs={self.langs!r} must be a non-empty list of language codes.")
        if self.ridge_towers == "tuned" and not self.ridge_ensemble:
            raise ConfigError("eval.ridge_towers=tuned is the ensemble's ridge map (the baseline's stays on the frozen "
                              "towers): set eval.ridge_ensemble: true as well, or leave ridge_towers frozen.")


@dataclass
class InitConfig(ConfigBase):
    """Start from a saved model instead of fresh heads: `from` a folder, optionally swapping its text tower."""

    source: str = knob(help="(spelt `from` in a recipe) a folder written by save_pretrained / lilt train")
    swap_text: str | dict | None = knob(None, "a text backbone name or text config to put under the kept vision "
                                        "side (lilt.swap_text_tower)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str | None = None) -> "InitConfig":
        """Read the recipe spelling, where the folder is `from` (a Python keyword, so not a field name)."""
        where = where or cls.__name__
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping with 'from' (a saved model folder), got {data!r}")
        data = dict(data)
        unknown = [k for k in data if k not in ("from", "source", "swap_text")]
        if unknown:
            hint = did_you_mean(str(unknown[0]), ["from", "swap_text"])
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}.{hint} Accepted keys: from, swap_text.")
        if "from" in data:
            data["source"] = data.pop("from")
        elif "source" not in data:
            raise ConfigError(f"{where}: missing required key 'from' (a saved model folder).")
        return super().from_dict(data, where)

    def to_dict(self) -> dict[str, Any]:
        """The recipe spelling (`from`, not `source`)."""
        out = super().to_dict()
        out["from"] = out.pop("source")
        return out

    def validate(self) -> None:
        if not self.source.strip():
            raise ConfigError("init.from is empty; name a folder written by save_pretrained / lilt train.")


@dataclass
class Recipe(ConfigBase):
    """Every section of a run; `Recipe.from_file(path, overrides)` reads and checks one."""

    key_separator: ClassVar[str] = ":"
    key_noun: ClassVar[str] = "section"

    model: ModelConfig = knob(help="the backbones, heads and temperature", default_factory=ModelConfig)
    plan: TuningPlan | None = knob(None, "which parameters train (lilt.TuningPlan); not with init (a saved "
                                   "model keeps its plan) unless init.swap_text re-plans the text side")
    data: DataConfig = knob(help="training and validation pairs", default_factory=DataConfig)
    train: TrainConfig = knob(help="optimizer, schedule, checkpoints, growth stages", default_factory=TrainConfig)
    eval: EvalConfig = knob(help="what the run is scored on afterwards", default_factory=EvalConfig)
    init: InitConfig | None = knob(None, "start from a saved model instead of fresh heads")

    def validate(self) -> None:
        if self.eval.translate and self.data.parallel is None:
            raise ConfigError("eval.translate fits its maps on parallel text: set data.parallel (e.g. "
                              "builtin:emoji-cldr, with data.parallel_langs: [sw]), or drop eval.translate.")
        if self.init is not None and self.init.swap_text is None and self.plan is not None:
            raise ConfigError(f"init.from={self.init.source!r} keeps that model's plan; drop the recipe's 'plan:' "
                              "section (or add init.swap_text to re-plan the text side).")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str | None = None) -> "Recipe":
        """Build from a mapping of sections; an unknown section is an error naming the closest one."""
        where = where or "recipe"
        empty = [k for k, v in data.items() if v is None and k in ("model", "data", "train", "eval")] \
            if isinstance(data, Mapping) else []
        if empty:  # `train:` with nothing under it: most likely every key was commented out by mistake
            raise ConfigError(f"{where}: section {empty[0]!r} is empty; give it keys, or remove the line to use the "
                              "defaults.")
        recipe = super().from_dict(data, where)
        if recipe.plan is not None and not recipe.plan.name and where.endswith((".yaml", ".yml", ".json")):
            recipe.plan.name = Path(where).stem
        return recipe

    @classmethod
    def from_file(cls, path: str | Path, overrides: Sequence[str] = ()) -> "Recipe":
        """Read a YAML/JSON recipe (or a built-in one by name) and apply KEY=VALUE overrides (e.g. train.steps=200)."""
        path = resolve_recipe(path)
        data = apply_overrides(read_mapping(path), overrides)
        return cls.from_dict(data, where=str(path))

    def require_model_source(self) -> None:
        """A run needs a plan for fresh heads, or an init: section naming a saved model."""
        if self.plan is None and self.init is None:
            raise ConfigError("the recipe has no 'plan:' section; a run needs one (or an 'init:' section that "
                              "starts from a saved model).")
