"""The one fold driver: runs rules over any :class:`~bnfold.core.protocol.GraphView` to a fixed point.

It owns what every backend would otherwise repeat: the order candidates are tried in, skipped rules,
aggregating refusals into one reason (the first, the others in the detail), the fixed point (a
fold may enable another: ``Conv -> BN -> BN``, conv-bn then a branch merge), the standalone
post-pass, and the report (one decision per normalization, in graph order, subgraphs after their
graph). A backend supplies the view and the rules (:mod:`bnfold.core.protocol`); nothing here
knows ONNX or torch.

How a node is handled:

- a normalization (``view.is_norm``): every rule whose ``find`` returns a site is a candidate, in
  rule order (rules that fold into the layer before it come first in the table). A skipped rule
  refuses with ``rule-disabled``. Before the first plan, ``view.check_norm`` may refuse for every
  rule at once. The first plan that does not refuse is applied; if all refuse, the norm is kept
  with the first refusal and the others in its detail; if no rule finds a site, it is kept with
  ``view.check_norm``'s refusal (training mode, unusable statistics), else ``no-foldable-producer``.
- any other node: its sites are tried in rule order and the first plan that succeeds is applied.
  A refusal is reported only for the normalizations the site carries (an identity-branch BN).
- after the fixed point, sites with ``after_fixed_point`` (standalone rewrites) are tried on the
  norms that are still kept, unless a rule was disabled for them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from bnfold.core.kept import without_remedy
from bnfold.core.protocol import GraphView, Rule
from bnfold.core.refuse import Refuse
from bnfold.core.sites import Site
from bnfold.report import Decision, Outcome, Reason, Report

__all__ = ["run_rules"]

logger = logging.getLogger(__name__)


def run_rules(
    view: GraphView,
    rules: Sequence[Rule],
    report: Report,
    *,
    skipped: Iterable[str] = (),
    rewrite_standalone: bool = False,
) -> None:
    """Fold ``view`` and then its subgraphs to a fixed point, adding one decision per node to ``report``.

    ``skipped`` names rules that must not apply (validate them first with
    :func:`bnfold.core.table.check_skip_rules`); ``rewrite_standalone`` turns on the rules whose sites
    come ``after_fixed_point``.
    """
    _Run(view, rules, set(skipped), rewrite_standalone).run(report)


class _Run:
    def __init__(self, view: GraphView, rules: Sequence[Rule], skipped: set[str], rewrite: bool) -> None:
        self.view = view
        self.rules = rules
        self.folding = [rule for rule in rules if not rule.site.after_fixed_point]
        self.post_pass = [rule for rule in rules if rule.site.after_fixed_point] if rewrite else []
        self.skipped = skipped
        self.rewrite = rewrite
        self.decisions: dict[int, Decision] = {}

    def run(self, report: Report) -> None:
        view = self.view
        original_order = list(view.live_nodes())
        progress = True
        while progress:
            progress = False
            for node in view.live_nodes():
                if view.is_removed(node) or self._folded(node):
                    continue
                progress |= self._visit(node)
        for node in view.live_nodes():
            decision = self.decisions.get(id(node))
            if decision is not None and decision.outcome is Outcome.KEPT and view.is_norm(node):
                self.decisions[id(node)] = self._post_pass(node, decision)
        for node in original_order:
            if id(node) in self.decisions:
                report.add(self.decisions[id(node)])
            elif view.is_per_sample_norm(node):
                report.add(self._decision(node, Outcome.NEVER_FOLDABLE, reason=Reason.PER_SAMPLE_STATISTICS))
        for subgraph in view.subgraphs():
            _Run(subgraph, self.rules, self.skipped, self.rewrite).run(report)

    def _folded(self, node: Any) -> bool:
        decision = self.decisions.get(id(node))
        return decision is not None and decision.outcome is Outcome.FOLDED

    def _sites(self, node: Any) -> list[tuple[Rule, Site]]:
        found = []
        for rule in self.folding:
            site = rule.find(self.view, node)
            if site is not None:
                found.append((rule, site))
        return found

    def _visit(self, node: Any) -> bool:
        """Try the sites at ``node``; True when a fold changed the graph."""
        found = self._sites(node)
        if self.view.is_norm(node):
            decision = self._fold_norm(node, found)
            self.decisions[id(node)] = decision
            return decision.outcome is Outcome.FOLDED
        for rule, site in found:
            try:
                plan = self._plan(rule, site)
            except Refuse as refusal:
                logger.debug("%s: %s refused: %s", self.view.label(node), rule.name, refusal)
                for norm in site.carried_norms:
                    detail = site.carried_refusal_detail(self.view.label(node), refusal.detail)
                    self.decisions[id(norm)] = self._kept(norm, refusal.with_detail(detail), rule)
                if site.reports_refusal:
                    self.decisions[id(node)] = self._kept(node, refusal, rule)
                continue
            self._apply(rule, site, plan)
            return True
        return False

    def _fold_norm(self, norm: Any, found: list[tuple[Rule, Site]]) -> Decision:
        if not found:
            try:
                self.view.check_norm(norm)
            except Refuse as refusal:
                # The norm's own reason (training mode, unusable statistics) first: nothing could use
                # it wherever it sat, and the no-site remedy (a standalone rewrite) would not either.
                return self._kept(norm, refusal)
            return self._kept(norm, Refuse(Reason.NO_FOLDABLE_PRODUCER, self.view.no_site_detail(norm)))
        checked = False
        refusals: list[tuple[Rule, Refuse]] = []
        for rule, site in found:
            if rule.name in self.skipped:
                refusals.append((rule, Refuse(Reason.RULE_DISABLED, f"rule {rule.name} is skipped")))
                continue
            if not checked:
                try:
                    self.view.check_norm(norm)
                except Refuse as refusal:
                    return self._kept(norm, refusal, rule)
                checked = True
            try:
                plan = rule.plan(self.view, site)
            except Refuse as refusal:
                refusals.append((rule, refusal))
                continue
            return self._apply(rule, site, plan)[id(norm)]
        rule, refusal = refusals[0]
        if len(refusals) > 1:
            also = "; ".join(
                f"{other.name}: {why.reason}" + (f" ({why.detail})" if why.detail else "")
                for other, why in refusals[1:]
            )
            refusal = refusal.with_detail(
                f"{refusal.detail}; also {also}" if refusal.detail else f"also {also}"
            )
        return self._kept(norm, refusal, rule)

    def _plan(self, rule: Rule, site: Site) -> Any:
        if rule.name in self.skipped:
            raise Refuse(Reason.RULE_DISABLED, f"rule {rule.name} is skipped")
        return rule.plan(self.view, site)

    def _apply(self, rule: Rule, site: Site, plan: Any, **fields: Any) -> dict[int, Decision]:
        """Apply ``plan`` and record the subject's and carried norms' decisions (taken before the
        apply renames outputs)."""
        pending = {id(site.subject): self._decision(site.subject, site.outcome, rule=rule.name, **fields)}
        for norm in site.carried_norms:
            pending[id(norm)] = self._decision(norm, Outcome.FOLDED, rule=rule.name)
        for node in site.absorbed:
            pending[id(node)] = self._decision(node, site.outcome, rule=rule.name)
        applied = rule.apply(self.view, plan)
        into = self.view.label(applied.into)
        logger.debug("%s: %s applied into %s", self.view.label(site.subject), rule.name, into)
        done = {key: replace(decision, into=into) for key, decision in pending.items()}
        self.decisions.update(done)
        return done

    def _post_pass(self, norm: Any, kept: Decision) -> Decision:
        """A kept norm rewritten on its own, unless its statistics are unusable or a rule was disabled."""
        if kept.reason is Reason.RULE_DISABLED:
            return kept
        for rule in self.post_pass:
            site = rule.find(self.view, norm)
            if site is None or rule.name in self.skipped:
                continue
            try:
                self.view.check_norm(norm)
            except Refuse:
                return kept
            try:
                plan = rule.plan(self.view, site)
            except Refuse as refusal:
                detail = without_remedy(kept.detail)  # the remedy was tried: it is this refusal
                why = f"{kept.reason}" + (f" ({detail})" if detail else "")
                return self._kept(norm, refusal.with_detail(f"{refusal.detail}; not foldable: {why}"), rule)
            detail = without_remedy(kept.detail)
            return self._apply(rule, site, plan, reason=kept.reason, detail=detail)[id(norm)]
        return kept

    def _kept(self, node: Any, refusal: Refuse, rule: Rule | None = None) -> Decision:
        return self._decision(
            node,
            Outcome.KEPT,
            rule=rule.name if rule is not None else None,
            reason=refusal.reason,
            detail=refusal.detail,
        )

    def _decision(self, node: Any, outcome: Outcome, **fields: Any) -> Decision:
        identity = self.view.identity(node)
        return Decision(
            node=identity.node,
            op_type=identity.op_type,
            output=identity.output,
            outcome=outcome,
            graph=self.view.path,
            **fields,
        )
