"""The plumbing every training script needs and no paper describes, written once.

    plumbing.cli          tyro arguments, the shared run flags, range checks, exit statuses
    plumbing.datasets     Minari datasets: resolve an id, download or build it, check it, reference scores
    plumbing.run_folder   the run folder: lock, config.json, progress.csv / episodes.csv, checkpoints, resume
    plumbing.tracking     optional TensorBoard / wandb mirror of the logged rows
    plumbing.compile      --compile: torch.compile / CUDA graphs around an agent's gradient step
    plumbing.recording    recording environment steps as a Minari dataset (D4RL-style exports)

A method script calls it in sentences (`dataset = load_dataset(...)`, `run = RunFolder.create(...)`)
and never needs it to be read to understand the algorithm. It never imports a script.
"""
