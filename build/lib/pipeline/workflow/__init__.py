"""What the stages share, a layer below them: what a stage is and the run folder it writes
(stage.py), and each stage's result type (results.py). No stage imports another stage."""
