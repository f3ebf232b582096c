"""Pruning logic, all pure functions: groups (what a unit owns), saliency (how much it
matters), schedule (when and how much), select (the pruning event)."""
