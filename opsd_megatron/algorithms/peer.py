"""Reference-free OPSD (``teacher.context: peer_success``): the teacher's privileged context is
another rollout of the same problem that the grader accepted, instead of a reference solution
(the paper's §7 direction). It needs answers, not worked solutions.

Per step, each problem gets G = ``rollout.num_rollouts`` rollouts (consecutive rows of the
step); rollout i of a group reads peer j ≠ i, the first correct rollout after i in the group,
cyclically (deterministic: a resumed run picks the same peers). A rollout with no correct peer
is left out of the loss and counted (``peer_skipped``), or with ``peer_success_or_reference``
reads the reference solution when the problem has one."""

from __future__ import annotations

PEER_CONTEXTS = ("peer_success", "peer_success_or_reference")


def peer_index(correct: list[bool], group: int) -> list[int | None]:
    """For every rollout, the index of the peer whose text the teacher reads, or None."""
    if len(correct) % group:
        raise ValueError(f"{len(correct)} rollouts do not form groups of {group}")
    out = []
    for i in range(len(correct)):
        start = i - i % group
        peers = [start + (i - start + d) % group for d in range(1, group)]
        out.append(next((j for j in peers if correct[j]), None))
    return out


def peer_solutions(
    problems: list[dict], texts: list[str], correct: list[bool], group: int, context: str
) -> list[str | None]:
    """The text each rollout's teacher reads as its solution (None: left out of the loss)."""
    chosen = []
    for i, j in enumerate(peer_index(correct, group)):
        if j is not None:
            chosen.append(texts[j])
        elif context == "peer_success_or_reference" and problems[i].get("solution"):
            chosen.append(problems[i]["solution"])
        else:
            chosen.append(None)
    return chosen
