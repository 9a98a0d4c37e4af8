// Renders chat requests through a Modelfile's TEMPLATE as ollama does, so the tests can hold ollama's prompt to
// tinymind's without ollama installed. What this mirrors of ollama (its template package): the template runs under
// Go's text/template with missingkey=zero and a `json` function (encoding/json); consecutive messages of one role
// but "tool" merge into one, joined by a blank line; the template sees System, Messages (Role, Content, Thinking,
// ToolCalls with Function.Name and Function.Arguments, the arguments printing as compact JSON), Tools (type and
// function: name, description and parameters with type, required and properties, each property's type, items,
// description and enum), Think and IsThinkSet. A request that leaves `think` out, to a model in whose template ollama
// finds thinking tags, thinks: ollama turns thinking on by default for such models.
//
// It also finds the tags ollama's parsers look for, as ollama finds them in a template: the tool-call tag is the
// first literal text under the first `if` on .ToolCalls, up to its "{" ("{" when there is none); the thinking tags
// are the first and last literal text around {{ .Thinking }} inside the range over .Messages. A tag found means
// ollama offers the model tool calling (which it also needs .Tools for) or thinking.
//
// stdin: {"template": "...", "requests": [{"messages": [...], "tools": [...], "think": true}]} in ollama's /api/chat
// shape; stdout: {"prompts": [...], "tool_tag": "...", "thinking_tags": ["...", "..."]}.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

type arguments map[string]any

func (a arguments) String() string {
	if a == nil {
		return "{}"
	}
	text, _ := json.Marshal(map[string]any(a))
	return string(text)
}

type toolCall struct {
	Function struct {
		Index     int       `json:"index"`
		Name      string    `json:"name"`
		Arguments arguments `json:"arguments"`
	} `json:"function"`
}

type message struct {
	Role      string     `json:"role"`
	Content   string     `json:"content"`
	Thinking  string     `json:"thinking"`
	ToolCalls []toolCall `json:"tool_calls"`
	ToolName  string     `json:"tool_name"`
}

type property struct {
	Type        any    `json:"type,omitempty"`
	Items       any    `json:"items,omitempty"`
	Description string `json:"description,omitempty"`
	Enum        []any  `json:"enum,omitempty"`
}

type tool struct {
	Type     string `json:"type"`
	Function struct {
		Name        string `json:"name"`
		Description string `json:"description"`
		Parameters  struct {
			Type       string              `json:"type"`
			Required   []string            `json:"required,omitempty"`
			Properties map[string]property `json:"properties"`
		} `json:"parameters"`
	} `json:"function"`
}

type request struct {
	Messages []message `json:"messages"`
	Tools    []tool    `json:"tools"`
	Think    *bool     `json:"think"`
}

func collate(messages []message) (string, []*message) {
	var system []string
	var collated []*message
	for i := range messages {
		if messages[i].Role == "system" {
			system = append(system, messages[i].Content)
		}
		if n := len(collated); n > 0 && collated[n-1].Role == messages[i].Role && messages[i].Role != "tool" {
			collated[n-1].Content += "\n\n" + messages[i].Content
		} else {
			collated = append(collated, &messages[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func usesField(pipe *parse.PipeNode, field string) bool {
	for _, command := range pipe.Cmds {
		for _, arg := range command.Args {
			if f, ok := arg.(*parse.FieldNode); ok && f.Ident[0] == field {
				return true
			}
		}
	}
	return false
}

func branches(node parse.Node) (*parse.PipeNode, []*parse.ListNode) {
	switch n := node.(type) {
	case *parse.IfNode:
		return n.Pipe, []*parse.ListNode{n.List, n.ElseList}
	case *parse.RangeNode:
		return n.Pipe, []*parse.ListNode{n.List, n.ElseList}
	case *parse.WithNode:
		return n.Pipe, []*parse.ListNode{n.List, n.ElseList}
	}
	return nil, nil
}

// toolCallIf is the first `if` (depth first) whose condition reads .ToolCalls.
func toolCallIf(nodes []parse.Node) *parse.IfNode {
	for _, node := range nodes {
		if n, ok := node.(*parse.IfNode); ok && usesField(n.Pipe, "ToolCalls") {
			return n
		}
		_, lists := branches(node)
		for _, list := range lists {
			if list != nil {
				if found := toolCallIf(list.Nodes); found != nil {
					return found
				}
			}
		}
	}
	return nil
}

// firstText is the first text that is not blank, looking into nested blocks and stopping at any action.
func firstText(nodes []parse.Node) (string, bool) {
	for _, node := range nodes {
		switch n := node.(type) {
		case *parse.TextNode:
			if strings.TrimSpace(string(n.Text)) != "" {
				return string(n.Text), true
			}
		case *parse.ActionNode:
			return "", false
		default:
			_, lists := branches(node)
			for _, list := range lists {
				if list != nil {
					if text, found := firstText(list.Nodes); found {
						return text, true
					}
				}
			}
			if lists != nil {
				return "", false
			}
		}
	}
	return "", false
}

func toolTag(tree *parse.Tree) string {
	tag := "{"
	if n := toolCallIf(tree.Root.Nodes); n != nil {
		if text, found := firstText(n.List.Nodes); found {
			before, _, _ := strings.Cut(text, "{")
			if before = strings.TrimSpace(before); before != "" {
				tag = before
			}
		}
	}
	return tag
}

// thinkingTags are the outer texts of the block that prints {{ .Thinking }} inside the range over .Messages.
func thinkingTags(list *parse.ListNode, inMessages bool) []string {
	for _, node := range list.Nodes {
		if action, ok := node.(*parse.ActionNode); ok && inMessages && usesField(action.Pipe, "Thinking") {
			first, firstIsText := list.Nodes[0].(*parse.TextNode)
			last, lastIsText := list.Nodes[len(list.Nodes)-1].(*parse.TextNode)
			if firstIsText && lastIsText {
				return []string{strings.TrimSpace(string(first.Text)), strings.TrimSpace(string(last.Text))}
			}
			return nil
		}
		pipe, lists := branches(node)
		_, isRange := node.(*parse.RangeNode)
		for _, inner := range lists {
			if inner != nil {
				if tags := thinkingTags(inner, inMessages || (isRange && usesField(pipe, "Messages"))); tags != nil {
					return tags
				}
			}
		}
	}
	return nil
}

func main() {
	var input struct {
		Template string    `json:"template"`
		Requests []request `json:"requests"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&input); err != nil {
		panic(err)
	}
	functions := template.FuncMap{"json": func(v any) string { text, _ := json.Marshal(v); return string(text) }}
	tmpl := template.Must(template.New("").Option("missingkey=zero").Funcs(functions).Parse(input.Template))
	tags := thinkingTags(tmpl.Tree.Root, false)
	output := map[string]any{"tool_tag": toolTag(tmpl.Tree), "thinking_tags": tags}
	var prompts []string
	for _, r := range input.Requests {
		if r.Think == nil && tags != nil {
			think := true
			r.Think = &think
		}
		system, messages := collate(r.Messages)
		var prompt strings.Builder
		err := tmpl.Execute(&prompt, map[string]any{
			"System": system, "Messages": messages, "Tools": r.Tools, "Response": "",
			"Think": r.Think != nil && *r.Think, "ThinkLevel": "", "IsThinkSet": r.Think != nil,
		})
		if err != nil {
			panic(err)
		}
		prompts = append(prompts, prompt.String())
	}
	output["prompts"] = prompts
	json.NewEncoder(os.Stdout).Encode(output)
}
