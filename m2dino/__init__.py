"""M2DINO: task-conditioned Mixture-of-Experts DINOv3 for multi-task ultrasound."""
