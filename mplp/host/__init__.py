"""The job side of mplp: what runs on the host around the pure library in `mplp`.

Experiment configs (`config`, the shipped ones in `configs/`), the `mplp train` loop and
its run directories (`train`), checkpoints, metrics and W&B (`tracking`), reports and plots
(`report`), data loading (`datasets`), trained rules from runs, files and W&B (`sources`, the
shipped ones in `pretrained/`), the memory check, progress bars and the `mplp` command
(`cli`). Library modules never import from here.
"""
