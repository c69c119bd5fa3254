# Two commands for a newcomer; both set everything up first.
.PHONY: demo test setup
setup:
	bash scripts/setup.sh
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
