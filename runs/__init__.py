"""The run layer: what a run is (its spec, resolved config and identity), its record, and how it
is executed with its prerequisites and evaluations, here or on Slurm.

    runs.records    the run-record schema, atomic writes, config hashes (stdlib only: `reports/`
                    imports it without importing torch or any model code)
    runs.identity   RunSpec, the resolved run config, the run's folder name
    runs.execute    run one run: prerequisites, pre-training, artifacts, evaluations, its record
    runs.slurm      the same runs as Slurm jobs (submitit)
    runs.cost       pre-training FLOPs and hours, without data
    runs.figures    the run's figures (reconstructions, attention maps)
    runs.archive    finished runs' records kept in results/, restored into outputs/

This file imports nothing, so that `import runs.records` stays light.
"""
