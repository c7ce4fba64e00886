"""The one category rule table of the library (SPEC §3 ``Pattern.from_trajectory``, SPEC §5 distillation).

A trajectory's category comes from its request type, its tools, its verdict and its tags, in this order:

1. the request type, matched case-insensitively against :data:`REQUEST_TYPE_RULES` (first rule wins):
   code / coding / programming → code_generation, research / analyze / analysis → research,
   creative / write / writing → creative;
2. any tool invoked → tool_use;
3. a Recovered verdict → reflection;
4. a tag *or the request type* containing reasoning / logic → reasoning, chat / conversation →
   conversational (:data:`TAG_RULES`);
5. general.

Distillation (SPEC §5) puts the verdict first (Recovered → reflection, Failure → error_recovery) and then
applies the same table. Both callers go through :func:`category_name`, so a request type such as
``"coding"`` means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["REQUEST_TYPE_RULES", "TAG_RULES", "category_name", "text_category"]

#: (keywords, category): a request type containing any keyword gets the category; first rule wins
REQUEST_TYPE_RULES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("code", "coding", "programming"), "code_generation"),
    (("research", "analyze", "analyse", "analysis"), "research"),
    (("creative", "write", "writing"), "creative"),
)
#: (keywords, category) matched against tags and the request type after tools and the verdict
TAG_RULES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("reasoning", "logic"), "reasoning"),
    (("chat", "conversation"), "conversational"),
)


_CONVERSATIONAL = next(keywords for keywords, name in TAG_RULES if name == "conversational")


def _match(rules: tuple[tuple[tuple[str, ...], str], ...], texts: Iterable[str]) -> str | None:
    low = [t.lower() for t in texts if t]
    for keywords, name in rules:
        if any(k in t for t in low for k in keywords):
            return name
    return None


def category_name(
    request_type: str | None,
    tags: Iterable[str] = (),
    tools: Iterable[str] = (),
    *,
    recovered: bool = False,
    failed: bool = False,
    verdict_first: bool = False,
) -> str:
    """Name of the category the rule table gives (see the module docstring).

    Args:
        request_type: the trajectory's request type (None when unknown).
        tags: its tags.
        tools: the tools it invoked.
        recovered: its verdict is Recovered.
        failed: its verdict is Failure (used only with ``verdict_first``).
        verdict_first: distillation's order: Recovered → reflection and Failure → error_recovery first.
    """
    if verdict_first:
        if recovered:
            return "reflection"
        if failed:
            return "error_recovery"
    rt = request_type or ""
    found = _match(REQUEST_TYPE_RULES, (rt,))
    if found is not None:
        return found
    if any(True for _ in tools):
        return "tool_use"
    if recovered:
        return "reflection"
    found = _match(TAG_RULES, [*tags, rt])
    return found if found is not None else "general"


def text_category(text: str | None, tags: Iterable[str] = (), request_type: str | None = None) -> str:
    """Category of a memory added by text (``ReasoningBank.add``): the request type (when given) and then
    the words of the text go through the request-type rules, then tags and text through the tag rules."""
    if request_type:
        found = _match(REQUEST_TYPE_RULES, (request_type,))
        if found is not None:
            return found
    # whole words of free text, so that "decode" or "rewrite" in a sentence does not decide the category
    words = {w.strip(".,;:!?()'\"") for w in (text or "").lower().split()}
    for keywords, name in REQUEST_TYPE_RULES:
        if words.intersection(keywords):
            return name
    found = _match(TAG_RULES, [*tags, request_type or ""])
    if found is not None:
        return found
    # of the tag rules, only the conversational one reads free text ("logic" in a sentence says little)
    if words.intersection(_CONVERSATIONAL):
        return "conversational"
    return "general"
