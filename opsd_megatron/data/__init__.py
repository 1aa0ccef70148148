"""Problems with reference solutions, tokenizers, and the student/teacher prompts."""
