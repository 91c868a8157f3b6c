"""TuningPlan applied: ordered rules deciding which parameters train, with full attribution and a budget.

A plan (`lilt.recipe.TuningPlan`, re-exported here) is data; this module applies it. A rule names
a tower (`vision`, `text`, `both`), a registered method, the layers it covers and the method's
options. `apply_plan` freezes everything, then applies the rules in order; a rule that matches
nothing is an error. Afterwards every parameter is attributed to the rule that last decided it,
or to "frozen" (or to "heads", which always train).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .growth.ops import GrowthOp
from .methods import get_method, select
from .recipe import Rule, TuningPlan

__all__ = ["Budget", "PlanState", "Rule", "RuleMatchError", "TuningPlan", "apply_plan", "budget"]


class RuleMatchError(ConfigError):
    """A plan rule matched no parameter."""


@dataclass
class PlanState:
    """A plan applied to a model: the plan and, per parameter name, the rule index that owns it."""

    plan: TuningPlan
    owners: dict[str, int | None] = field(default_factory=dict)  # None: frozen
    # In a tower whose head is frozen (a text-tower swap), parameters a rule tuned before a later rule
    # locked them: they hold the source model's trained values, so checkpoints must keep them.
    tuned: set[str] = field(default_factory=set)
    # Parameters added by growth (lilt.growth), with the index of the op in the model's growth history.
    grown: dict[str, int] = field(default_factory=dict)

    def label(self, name: str) -> str:
        """'heads', 'frozen', 'growth N', or the owning rule's label."""
        if name in HEAD_PARAMS:
            return "heads"
        if name in self.grown:
            return f"growth {self.grown[name] + 1}"
        index = self.owners.get(name)
        return "frozen" if index is None else self.plan.rules[index].label(index)


# Parameters of the DualEncoder outside the towers: they always train.
HEAD_PARAMS = ("vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias",
               "logit_scale", "logit_bias")


def _towers(model: Any, which: str) -> list[tuple[str, Any]]:
    names = ["vision", "text"] if which == "both" else [which]
    return [(n, getattr(model, n)) for n in names]


def apply_plan(model: Any, plan: TuningPlan | str | Path) -> PlanState:
    """Freeze the model, apply each rule in order, and attribute every parameter."""
    if not isinstance(plan, TuningPlan):
        plan = TuningPlan.from_recipe(plan)
    if getattr(model, "plan_state", None) is not None:
        raise ConfigError("this model already has a plan applied; build a fresh model to apply another.")
    model.requires_grad_(False)
    owner: dict[Any, int | None] = {}
    tuned: set[Any] = set()
    for index, rule in enumerate(plan.rules):
        spec = get_method(rule.method)
        for tower_name, tower in _towers(model, rule.tower):
            try:
                selection = select(tower, rule.layers)
                result = spec.apply(tower, selection, rule.parsed_options, f"r{index + 1}")
            except ConfigError as err:
                raise type(err)(f"{rule.label(index)}, {tower_name} tower: {err}") from err
            if not result.trainable and not result.frozen:
                raise RuleMatchError(
                    f"{rule.label(index)} matched nothing in the {tower_name} tower: no parameter of the selection "
                    f"{rule.layers!r} is one that `{rule.method}` tunes. Check the layers, or drop the rule; "
                    f"`lilt info` lists the tower's blocks.")
            owner.update({p: index for p in result.trainable})
            tuned.update(result.trainable)
            owner.update({p: None for p in result.frozen})
    state = PlanState(plan)
    for name, param in model.named_parameters():
        if name in HEAD_PARAMS:
            param.requires_grad_(name.split("_proj.")[0] not in plan.frozen_heads)
            continue
        index = owner.get(param)
        if param.requires_grad != (index is not None):
            raise RuntimeError(f"internal error: {name} has requires_grad={param.requires_grad} but is "
                               f"attributed to {'frozen' if index is None else plan.rules[index].label(index)}")
        state.owners[name] = index
        if param in tuned and name.split(".")[0] in plan.frozen_heads:
            state.tuned.add(name)
    model.plan_state = state
    return state


@dataclass
class Budget:
    """Trainable parameter counts of a model: totals, per tower, per method and per rule."""

    plan: str
    trainable: int
    total: int
    by_tower: dict[str, dict[str, float]]
    by_method: dict[str, dict[str, float]]
    by_rule: list[dict[str, Any]]

    @property
    def percent(self) -> float:
        """Trainable share of all parameters, in percent."""
        return 100.0 * self.trainable / max(self.total, 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with keys trainable, total, percent, by_tower, by_method, by_rule."""
        return {"plan": self.plan, "trainable": self.trainable, "total": self.total,
                "percent": round(self.percent, 4), "by_tower": self.by_tower, "by_method": self.by_method,
                "by_rule": self.by_rule}

    def __str__(self) -> str:
        lines = [f"plan {self.plan or '(none)'}: {self.trainable:,} of {self.total:,} parameters train "
                 f"({self.percent:.2f}%)", "",
                 f"{'tower':<10}{'trainable':>14}{'total':>16}{'%':>9}"]
        for tower, row in self.by_tower.items():
            lines.append(f"{tower:<10}{row['trainable']:>14,}{row['total']:>16,}{row['percent']:>9.2f}")
        lines += ["", f"{'method':<12}{'trainable':>14}{'% of all':>10}   rule"]
        for row in self.by_rule:
            lines.append(f"{row['method']:<12}{row['trainable']:>14,}{row['percent']:>10.3f}   {row['label']}")
        return "\n".join(lines)


def budget(model: Any) -> Budget:
    """Count trainable parameters per tower, per method and per rule (percent of all parameters)."""
    state: PlanState | None = getattr(model, "plan_state", None)
    rules = state.plan.rules if state else []
    total = trainable = 0
    towers: dict[str, list[int]] = {"vision": [0, 0], "text": [0, 0], "heads": [0, 0]}
    if getattr(model, "shared_encoder", None) is not None:
        towers["shared"] = [0, 0]
    per_rule = [0] * len(rules)
    history = getattr(model, "growth", [])
    per_op = [0] * len(history)
    heads = unplanned = 0
    for name, p in model.named_parameters():
        n = p.numel()
        top = name.split(".")[0]
        tower = top if top in ("vision", "text") else "shared" if top == "shared_encoder" else "heads"
        total += n
        towers[tower][1] += n
        if p.requires_grad:
            trainable += n
            towers[tower][0] += n
            index = state.owners.get(name) if state else None
            if state is not None and name in state.grown:
                per_op[state.grown[name]] += n
            elif tower == "heads":
                heads += n
            elif index is not None:
                per_rule[index] += n
            else:  # no plan applied: the towers train in full
                unplanned += n
    pct = (lambda k, t: round(100.0 * k / max(t, 1), 4))
    by_tower = {t: {"trainable": k, "total": n, "percent": pct(k, n)} for t, (k, n) in towers.items()}
    by_rule = [{"rule": i + 1, "label": r.label(i), "tower": r.tower, "method": r.method, "trainable": per_rule[i],
                "percent": pct(per_rule[i], total)} for i, r in enumerate(rules)]
    by_rule += [{"rule": 0, "label": f"growth {i + 1} ({record['op']})", "tower": GrowthOp.parse(record["op"]).part,
                 "method": "growth", "trainable": per_op[i], "percent": pct(per_op[i], total)}
                for i, record in enumerate(history)]
    by_rule.append({"rule": 0, "label": "projection heads + logit scale", "tower": "heads", "method": "heads",
                    "trainable": heads, "percent": pct(heads, total)})
    if unplanned:
        by_rule.append({"rule": 0, "label": "no plan applied: everything trains", "tower": "both",
                        "method": "unplanned", "trainable": unplanned, "percent": pct(unplanned, total)})
    by_method: dict[str, dict[str, float]] = {}
    for row in by_rule:
        entry = by_method.setdefault(row["method"], {"trainable": 0, "percent": 0.0})
        entry["trainable"] += row["trainable"]
        entry["percent"] = pct(entry["trainable"], total)
    return Budget(state.plan.name if state else "", trainable, total, by_tower, by_method, by_rule)
