#!/bin/bash
# issue 21: the PushT image policy, resumable (rerun the same command to continue; THREADS=2 when alone)
cd /work/main && . .venv/bin/activate
python -m paradiffpolicy.train task=pusht_image dataset=data/pusht_image.zarr output_dir=outputs/train/pusht_image \
  steps=30000 checkpoint_every=500 policy.vision.backbone_width=16 threads=${THREADS:-1} export=outputs/pusht_image_export \
  progress=false hydra.run.dir=outputs/train/pusht_image/hydra >> outputs/train-pusht_image.log 2>&1
echo "train rc=$? $(date +%T)" >> outputs/train-pusht_image.log
