{{- define "keyward.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "keyward.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "keyward.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Where the TLS files are mounted. */}}
{{- define "keyward.tlsDir" -}}/etc/keyward/tls{{- end -}}

{{/* The API port's name: https, or http with allowPlaintext. */}}
{{- define "keyward.apiPortName" -}}
{{- if .Values.tls.secretName -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{/*
Refuses combinations that Keyward would refuse at start, with a message that
says what to set, so that a bad release fails at `helm install`, not in a
crash loop.
*/}}
{{- define "keyward.validate" -}}
{{- $tls := .Values.tls -}}
{{- if and $tls.secretName .Values.allowPlaintext -}}
{{- fail "keyward: set either tls.secretName (Keyward serves TLS) or allowPlaintext=true (a proxy in front terminates TLS), not both" -}}
{{- end -}}
{{- if not (or $tls.secretName .Values.allowPlaintext) -}}
{{- fail "keyward: Keyward refuses plain HTTP on a pod address. Set tls.secretName to a kubernetes.io/tls Secret (tls.crt, tls.key), or allowPlaintext=true only behind a proxy or mesh that terminates TLS" -}}
{{- end -}}
{{- if and $tls.clientCa.secretName (not $tls.secretName) -}}
{{- fail "keyward: tls.clientCa (mutual TLS) needs tls.secretName as well" -}}
{{- end -}}
{{- if and $tls.clientCrl.secretName (not $tls.clientCa.secretName) -}}
{{- fail "keyward: tls.clientCrl needs tls.clientCa.secretName: CRLs apply to client certificates" -}}
{{- end -}}
{{- end -}}
