package config

// KeyValue is one key's effective value.
type KeyValue struct {
	Key   string `json:"key"`
	Value string `json:"value"`
}

// Values lists every key with its value in c, in the order of Keys().
// Secrets that are set show as "[redacted]", so the list is safe to print.
func (c Config) Values() []KeyValue {
	table := keyTable()
	out := make([]KeyValue, 0, len(table))
	for _, k := range table {
		v := k.get(&c)
		if k.secret && v != "" {
			v = redactedValue
		}
		out = append(out, KeyValue{Key: k.name, Value: v})
	}
	return out
}
