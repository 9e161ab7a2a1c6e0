"""The Ray plumbing below the stages: where tasks go (placement), how the driver waits for
them (progress lines), what every task does first (thread pinning, heap trimming), and the
distributed exact top-k that the teacher and the evaluation share. It imports no stage; the
stages and the runner import it."""
