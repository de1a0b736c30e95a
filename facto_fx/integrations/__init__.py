"""facto_fx inside other training frameworks; each module needs its framework (an optional extra), and
`import facto_fx` imports none of them."""
