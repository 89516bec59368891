"""Online rebalancing: plan a new placement policy and the fewest moves that reach it.

plan = plan_hash(policy, shards=[*policy.shards, "s3"])
print(plan.describe())
raise_for_problems(plan)
"""

from ._planner import (
    Move,
    PlannedPolicy,
    RebalancePlan,
    plan_field,
    plan_hash,
    plan_time,
    raise_for_problems,
)

__all__ = [
    "Move",
    "PlannedPolicy",
    "RebalancePlan",
    "plan_field",
    "plan_hash",
    "plan_time",
    "raise_for_problems",
]
