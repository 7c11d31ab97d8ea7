"""The two training stages (FP teacher, QAT student) and what a job needs around them."""
