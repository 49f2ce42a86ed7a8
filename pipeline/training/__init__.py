"""Stage two: students trained from the features store alone (data, losses, balancer, the loop, tracking), and the
demo teacher's pretraining, which reuses the loop."""
