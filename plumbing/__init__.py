"""The plumbing every training script needs and no paper describes, written once.

    plumbing.errors       the exceptions that end a run and the stop flag (a leaf: imports no other module here)
    plumbing.runtime      pick_device, seed_everything, progress_bar
    plumbing.cli          RunArgs (the shared run flags), run_main (parse, check, exit statuses), check_ranges
    plumbing.datasets     open_task (dataset, environments, reference scores), check_transitions
    plumbing.run_folder   open_run, load_pretrained, check_run_size, PROGRESS_COLUMNS: the run folder, its logs,
                          checkpoints and resume
    plumbing.compile      compile_step: torch.compile / CUDA graphs around an agent's gradient step (--compile)
    plumbing.tracking     the optional TensorBoard / wandb mirror of the logged rows (--track)
    plumbing.recording    EpisodeRecorder: environment steps saved as a Minari dataset (baselines/redq.py exports)

A method script calls it in sentences (`task = open_task(args)`, `run = open_run(args, METHOD, task)`)
and never needs it to be read to understand the algorithm. It never imports a script.
"""
