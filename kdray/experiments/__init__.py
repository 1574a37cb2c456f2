"""Many runs: deciding, running and following up experiments.

Which trials an experiment runs (:mod:`.plan`), the pre-flight before any compute
(:mod:`.check`), sweeps and ablations on Ray Tune (:mod:`.sweep`, the only module that imports
Ray), the experiments that follow a sweep (:mod:`.followup`) and the whole study that chains them
(:mod:`.study`), the teacher search (:mod:`.teacher_search`), the student exported from an
experiment (:mod:`.export`) and the harness that kills a command and checks what it left
(:mod:`.fault_harness`).
"""
