"""wanray: fine-tune and serve Wan2.2 video experts on Ray."""
