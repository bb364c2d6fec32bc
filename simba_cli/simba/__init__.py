"""The Simba method: criteria, schedules, the pruned forward, FLOPs and the pruned-model artifact."""
