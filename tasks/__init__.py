"""seqio task and mixture registrations (installed as `stmoe.tasks`; importing registers them)."""
