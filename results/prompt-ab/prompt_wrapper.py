"""Scratch: the demo benchmark with another prompt template (monkeypatched)."""
import sys, os
sys.path.insert(0, '/work/main/benchmarks')
template = os.environ["PROMPT"]
import ipm.model, ipm.search, ipm.train

def prompt_ids(tokenizer, question, _template=None):
    question = " ".join(question.split())
    return tokenizer(template.format(question=question), add_special_tokens=True).input_ids
ipm.model.prompt_ids = ipm.search.prompt_ids = ipm.train.prompt_ids = prompt_ids
import demo
demo.main(sys.argv[1:])
