"""What happens after pretraining: evaluators and detectron2 transfer."""
