#!/bin/bash
# issue 21: the PushT image policy, resumable (rerun the same command to continue; THREADS=2 when alone).
# Stage 1: 30,000 steps from scratch on 200 expert episodes (18% Picard on 50 episodes, a plateau
# since step 12,500: the image encoder stays weak). Stage 2: fine-tune its EMA on 600 episodes (the
# first 200 are stage 1's) with a fresh learning-rate schedule, the encoder also regressing the
# simulator's state (the T's keypoints and the agent, replayed from the expert; training only).
cd /work/main && . .venv/bin/activate
common="task=pusht_image policy.vision.backbone_width=16 checkpoint_every=500 threads=${THREADS:-1} progress=false"
python -m paradiffpolicy.train $common dataset=data/pusht_image.zarr output_dir=outputs/train/pusht_image \
  steps=30000 export=outputs/pusht_image_export hydra.run.dir=outputs/train/pusht_image/hydra >> outputs/train-pusht_image.log 2>&1
rc=$?; echo "stage 1 rc=$rc $(date +%T)" >> outputs/train-pusht_image.log
[ $rc -eq 0 ] || exit $rc  # interrupted: rerun to resume stage 1
[ -d outputs/train/pusht_image/step30000 ] || cp -r outputs/train/pusht_image/last outputs/train/pusht_image/step30000
python -m paradiffpolicy.collect task=pusht_image n_episodes=600 seed=0 output=data/pusht_image_600.zarr progress=false \
  hydra.run.dir=outputs/collect/pusht_image_600 >> outputs/collect-pusht_image_600.log 2>&1 || exit
[ -e data/pusht_image_600.zarr/data/privileged.state ] || python -m paradiffpolicy.data.add_privileged_state \
  store=data/pusht_image_600.zarr state_task=pusht_keypoints progress=false >> outputs/privileged-pusht_image_600.log 2>&1 || exit
python -m paradiffpolicy.train $common dataset=data/pusht_image_600.zarr output_dir=outputs/train/pusht_image_aux \
  init_from=outputs/train/pusht_image/step30000 steps=10000 aux_state=privileged.state aux_weight=1.0 \
  export=outputs/pusht_image_aux_export hydra.run.dir=outputs/train/pusht_image_aux/hydra >> outputs/train-pusht_image_aux.log 2>&1
echo "stage 2 rc=$? $(date +%T)" >> outputs/train-pusht_image_aux.log
